//! The streaming server against a fake backend, driven over real TCP by our own SPDY client and
//! a tungstenite WebSocket client. (crictl and the kubelet, Go peers, drive it in tests/.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wasmlet_streaming::spdy::{Connection, Role, Stream};
use wasmlet_streaming::*;

/// `cat` echoes stdin to stdout; `fail N` writes to stderr and exits N; `hang` runs until
/// dropped (and notes the drop).
struct Fake {
    dropped: Arc<AtomicBool>,
    echo_port: u16,
}

struct NoteDrop(Arc<AtomicBool>);
impl Drop for NoteDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Backend for Fake {
    async fn exec(&self, req: &ExecRequest, mut io: Stdio) -> Result<i32, String> {
        match req.cmd[0].as_str() {
            "cat" => {
                let mut stdin = io.stdin.take().ok_or("no stdin")?;
                let mut out = io.stdout.take().ok_or("no stdout")?;
                let n = tokio::io::copy(&mut stdin, &mut out).await.map_err(|e| e.to_string())?;
                out.write_all(format!("\n{n} bytes\n").as_bytes()).await.map_err(|e| e.to_string())?;
                Ok(0)
            }
            "fail" => {
                let mut err = io.stderr.take().ok_or("no stderr")?;
                err.write_all(b"it failed\n").await.map_err(|e| e.to_string())?;
                Ok(req.cmd[1].parse().unwrap())
            }
            "hang" => {
                let _guard = NoteDrop(self.dropped.clone());
                let mut out = io.stdout.take().ok_or("no stdout")?;
                out.write_all(b"started\n").await.map_err(|e| e.to_string())?;
                out.flush().await.map_err(|e| e.to_string())?;
                std::future::pending::<()>().await;
                Ok(0)
            }
            "size" => {
                let mut sizes = io.resize.take().ok_or("no resize")?;
                let s = sizes.recv().await.ok_or("no size")?;
                let mut out = io.stdout.take().ok_or("no stdout")?;
                out.write_all(format!("{}x{} tty={}", s.width, s.height, io.tty).as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(0)
            }
            other => Err(format!("{other:?}: no such file or directory")),
        }
    }

    async fn attach(&self, _: &AttachRequest, _: Stdio) -> Result<(), String> {
        Err("not attachable".into())
    }

    async fn port_forward(&self, _sandbox: &str, port: u16) -> Result<TcpStream, String> {
        let target = if port == 80 { self.echo_port } else { port };
        TcpStream::connect(("127.0.0.1", target)).await.map_err(|e| format!("dial tcp4 127.0.0.1:{port}: {e}"))
    }
}

async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

async fn server() -> (Server, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    let fake = Fake { dropped: dropped.clone(), echo_port: echo_server().await };
    let s = Server::start(Config::default(), Arc::new(fake)).await.unwrap();
    (s, dropped)
}

fn exec(cmd: &[&str], stdin: bool, stdout: bool, stderr: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout,
        stderr,
    }
}

/// Sends the upgrade request and returns the answer's head and the connection.
async fn upgrade(url: &str, extra: &[(&str, &str)]) -> (String, TcpStream) {
    spdy::request_upgrade(url, extra).await.unwrap()
}

const SPDY_V4: &[(&str, &str)] =
    &[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "v4.channel.k8s.io")];

async fn spdy(url: &str) -> Connection {
    let (head, tcp) = upgrade(url, SPDY_V4).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-stream-protocol-version: v4.channel.k8s.io"), "{head}");
    Connection::start(tcp, Role::Client).0
}

async fn open(c: &Connection, kind: &str) -> Stream {
    c.open(vec![("streamtype".into(), kind.into())]).await.unwrap()
}

async fn read_all(s: &mut Stream) -> String {
    let mut v = Vec::new();
    while let Some(b) = s.rx.recv().await {
        v.extend_from_slice(&b);
    }
    String::from_utf8(v).unwrap()
}

#[tokio::test]
async fn spdy_exec_carries_stdin_stdout_and_the_status() {
    let (srv, _) = server().await;
    let url = srv.exec_url(exec(&["cat"], true, true, false, false)).unwrap();
    let c = spdy(&url).await;
    let mut error = open(&c, "error").await;
    let stdin = open(&c, "stdin").await;
    let mut stdout = open(&c, "stdout").await;
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    stdin.tx.send(big).await.unwrap();
    stdin.tx.finish().await.unwrap();
    let out = read_all(&mut stdout).await;
    assert_eq!(out.len(), (1 << 20) + "\n1048576 bytes\n".len());
    assert!(out.ends_with("\n1048576 bytes\n"));
    assert_eq!(read_all(&mut error).await, r#"{"metadata":{},"status":"Success"}"#);
    c.closed().await;

    // The URL was single-use.
    let (head, _) = upgrade(&url, SPDY_V4).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[tokio::test]
async fn spdy_exec_reports_an_exit_code_and_a_failure_to_run() {
    let (srv, _) = server().await;
    let c = spdy(&srv.exec_url(exec(&["fail", "3"], false, true, true, false)).unwrap()).await;
    let mut error = open(&c, "error").await;
    let mut stdout = open(&c, "stdout").await;
    let mut stderr = open(&c, "stderr").await;
    assert_eq!(read_all(&mut stderr).await, "it failed\n");
    assert_eq!(read_all(&mut stdout).await, "");
    let status: serde_json::Value = serde_json::from_str(&read_all(&mut error).await).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    let c = spdy(&srv.exec_url(exec(&["/no/such"], false, true, false, false)).unwrap()).await;
    let mut error = open(&c, "error").await;
    let _stdout = open(&c, "stdout").await;
    let status: serde_json::Value = serde_json::from_str(&read_all(&mut error).await).unwrap();
    assert_eq!(status["reason"], "InternalError");
    assert!(status["message"].as_str().unwrap().contains("\"/no/such\": no such file or directory"), "{status}");
}

#[tokio::test]
async fn a_client_that_leaves_stops_its_exec() {
    let (srv, dropped) = server().await;
    let c = spdy(&srv.exec_url(exec(&["hang"], false, true, false, false)).unwrap()).await;
    let _error = open(&c, "error").await;
    let mut stdout = open(&c, "stdout").await;
    assert_eq!(stdout.rx.recv().await.unwrap(), "started\n");
    assert!(!dropped.load(Ordering::SeqCst));
    c.close().await;
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the exec was not stopped when its client left");
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_kubelets_words() {
    let (srv, _) = server().await;
    assert!(srv.exec_url(exec(&["cat"], false, false, false, false)).unwrap_err().to_string().contains("one of stdin"));
    assert!(srv.exec_url(exec(&["cat"], false, true, true, true)).unwrap_err().to_string().contains("tty and stderr"));
    assert!(srv.exec_url(exec(&[], false, true, false, false)).is_err());
    let url = srv.exec_url(exec(&["cat"], true, true, false, false)).unwrap();
    let (head, _) = upgrade(&url, &[]).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let url = srv.exec_url(exec(&["cat"], true, true, false, false)).unwrap();
    let (head, _) = upgrade(&url, &[("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "v9.bogus")]).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _) = upgrade(&format!("{}/exec/nosuchtoken", srv.base_url()), SPDY_V4).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // An expired URL is gone too.
    let short = Server::start(
        Config { request_ttl: Duration::from_millis(10), ..Config::default() },
        Arc::new(Fake { dropped: Arc::default(), echo_port: 1 }),
    )
    .await
    .unwrap();
    let url = short.exec_url(exec(&["cat"], true, true, false, false)).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (head, _) = upgrade(&url, SPDY_V4).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // At most so many wait.
    let tiny = Server::start(
        Config { max_in_flight: 1, ..Config::default() },
        Arc::new(Fake { dropped: Arc::default(), echo_port: 1 }),
    )
    .await
    .unwrap();
    tiny.exec_url(exec(&["cat"], true, true, false, false)).unwrap();
    assert!(matches!(tiny.exec_url(exec(&["cat"], true, true, false, false)), Err(Error::TooManyRequests(1))));
}

async fn ws(url: &str, protocol: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let mut req = url.replace("http://", "ws://").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let host = url.strip_prefix("http://").unwrap().split('/').next().unwrap();
    let tcp = TcpStream::connect(host).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], protocol);
    ws
}

#[tokio::test]
async fn websocket_v5_exec_with_the_close_signal() {
    let (srv, _) = server().await;
    let mut w = ws(&srv.exec_url(exec(&["cat"], true, true, false, false)).unwrap(), "v5.channel.k8s.io").await;
    w.send(Message::binary(b"\x00hello".to_vec())).await.unwrap();
    w.send(Message::binary(vec![255, 0])).await.unwrap();
    let mut stdout = Vec::new();
    let mut status = String::new();
    let mut closed_normally = false;
    while let Some(Ok(m)) = w.next().await {
        if let Message::Close(Some(f)) = &m {
            closed_normally = f.code == tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal;
        }
        let Message::Binary(b) = m else { continue };
        match b[0] {
            1 => stdout.extend_from_slice(&b[1..]),
            3 => status.push_str(std::str::from_utf8(&b[1..]).unwrap()),
            _ => {}
        }
    }
    assert_eq!(String::from_utf8(stdout).unwrap(), "hello\n5 bytes\n");
    assert_eq!(status, r#"{"metadata":{},"status":"Success"}"#);
    assert!(closed_normally, "client-go reads any close but a normal one as an error");
}

#[tokio::test]
async fn websocket_base64_and_resize() {
    let (srv, _) = server().await;
    let mut w = ws(&srv.exec_url(exec(&["size"], false, true, false, true)).unwrap(), "v4.base64.channel.k8s.io").await;
    use base64::Engine;
    let size = base64::engine::general_purpose::STANDARD.encode(br#"{"Width":120,"Height":40}"#);
    w.send(Message::text(format!("4{size}"))).await.unwrap();
    let mut stdout = Vec::new();
    while let Some(Ok(m)) = w.next().await {
        let Message::Text(t) = m else { continue };
        if let Some(b64) = t.strip_prefix('1') {
            stdout.extend(base64::engine::general_purpose::STANDARD.decode(b64).unwrap());
        }
    }
    assert_eq!(String::from_utf8(stdout).unwrap(), "120x40 tty=true");
}

#[tokio::test]
async fn spdy_port_forward_keeps_the_connection_for_other_streams() {
    let (srv, _) = server().await;
    let url = srv.port_forward_url(PortForwardRequest { sandbox_id: "p1".into(), ports: vec![] }).unwrap();
    let (head, tcp) = upgrade(
        &url,
        &[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", "portforward.k8s.io")],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (c, _) = Connection::start(tcp, Role::Client);
    let pair = |port: &str, id: &str| {
        let c = c.clone();
        let (port, id) = (port.to_string(), id.to_string());
        async move {
            let h = |t: &str| {
                vec![("streamtype".into(), t.into()), ("port".into(), port.clone()), ("requestid".into(), id.clone())]
            };
            let error = c.open(h("error")).await.unwrap();
            let data = c.open(h("data")).await.unwrap();
            (data, error)
        }
    };
    // A closed port: the error reaches the client.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let (mut data, mut error) = pair(&closed.to_string(), "0").await;
    let msg = read_all(&mut error).await;
    assert!(msg.contains(&format!("error forwarding port {closed} to pod p1")), "{msg}");
    assert_eq!(read_all(&mut data).await, "");
    // Two concurrent forwards on the same connection afterwards.
    let (mut d1, _e1) = pair("80", "1").await;
    let (mut d2, _e2) = pair("80", "2").await;
    d1.tx.send(Bytes::from_static(b"one")).await.unwrap();
    d2.tx.send(Bytes::from_static(b"two")).await.unwrap();
    d1.tx.finish().await.unwrap();
    d2.tx.finish().await.unwrap();
    assert_eq!(read_all(&mut d1).await, "one");
    assert_eq!(read_all(&mut d2).await, "two");
    // A stream without a port is refused; the connection goes on.
    assert!(c.open(vec![("streamtype".into(), "data".into())]).await.is_err());
    let (mut d3, _e3) = pair("80", "3").await;
    d3.tx.send(Bytes::from_static(b"three")).await.unwrap();
    d3.tx.finish().await.unwrap();
    assert_eq!(read_all(&mut d3).await, "three");
}

#[tokio::test]
async fn websocket_port_forward_names_each_channels_port() {
    let (srv, _) = server().await;
    let url = srv.port_forward_url(PortForwardRequest { sandbox_id: "p1".into(), ports: vec![80] }).unwrap();
    let mut w = ws(&format!("{url}?port=80"), "v4.channel.k8s.io").await;
    let mut firsts = Vec::new();
    while firsts.len() < 2 {
        let Some(Ok(Message::Binary(b))) = w.next().await else { panic!("no port message") };
        firsts.push(b.to_vec());
    }
    assert!(firsts.contains(&vec![0, 80, 0]) && firsts.contains(&vec![1, 80, 0]), "{firsts:?}");
    w.send(Message::binary(b"\x00ping".to_vec())).await.unwrap();
    let Some(Ok(Message::Binary(b))) = w.next().await else { panic!("no echo") };
    assert_eq!(&b[..], b"\x00ping");
}
