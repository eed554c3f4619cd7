//! Exec and attach sessions, over SPDY or WebSocket: which streams the client opens, the pumps
//! between them and the backend, and the Status the error stream carries at the end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::channels::{Channels, Framing};
use crate::spdy;
use crate::{AttachRequest, Backend, Error, ExecRequest, Out, Stdio, TermSize};

/// The remote command protocols over SPDY, best first (v5 is v4 there: its close signal is a
/// WebSocket matter).
pub const SPDY_EXEC_PROTOCOLS: &[&str] =
    &["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"];

/// WebSocket channel numbers.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// How much of a stream is in flight between the client and the backend (per direction).
const PIPE: usize = 64 * 1024;

/// The streams a session asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

enum Conn {
    Spdy(spdy::Connection),
    Ws(Channels),
}

impl Conn {
    async fn closed(&self) {
        match self {
            Conn::Spdy(c) => c.closed().await,
            Conn::Ws(c) => c.closed().await,
        }
    }
    async fn close(&self) {
        match self {
            Conn::Spdy(c) => c.close().await,
            Conn::Ws(c) => c.close().await,
        }
    }
}

/// An exec or attach session whose streams are all there.
pub(crate) struct Session {
    conn: Conn,
    stdin: Option<mpsc::Receiver<Bytes>>,
    stdout: Option<Out>,
    stderr: Option<Out>,
    error: Option<Out>,
    resize: Option<mpsc::Receiver<Bytes>>,
    json_status: bool,
    tty: bool,
}

/// Waits for the streams a SPDY client opens (error, and stdin/stdout/stderr/resize as asked),
/// answering each, for at most `timeout`.
pub(crate) async fn spdy_session(
    conn: spdy::Connection,
    mut incoming: mpsc::Receiver<spdy::Stream>,
    protocol: &str,
    opts: Options,
    timeout: Duration,
) -> Result<Session, Error> {
    let resize_ok = !matches!(protocol, "" | "channel.k8s.io" | "v2.channel.k8s.io");
    let mut expected = 1 + opts.stdin as usize + opts.stdout as usize + opts.stderr as usize;
    if opts.tty && resize_ok {
        expected += 1;
    }
    let mut s = Session {
        conn: Conn::Spdy(conn.clone()),
        stdin: None,
        stdout: None,
        stderr: None,
        error: None,
        resize: None,
        json_status: protocol.starts_with("v4.") || protocol.starts_with("v5."),
        tty: opts.tty,
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut received = 0;
    while received < expected {
        let stream = tokio::select! {
            s = incoming.recv() => s.ok_or(Error::Closed)?,
            _ = &mut deadline => return Err(Error::Protocol("timed out waiting for client to create streams".into())),
        };
        conn.accept(&stream).await?;
        let kind = spdy::header(&stream.headers, "streamtype").unwrap_or("").to_string();
        match kind.as_str() {
            "error" => s.error = Some(Out::Spdy(stream.tx)),
            "stdin" => s.stdin = Some(stream.rx),
            "stdout" => s.stdout = Some(Out::Spdy(stream.tx)),
            "stderr" => s.stderr = Some(Out::Spdy(stream.tx)),
            "resize" => s.resize = Some(stream.rx),
            other => {
                tracing::debug!(stream_type = other, "unexpected stream type");
                continue;
            }
        }
        received += 1;
    }
    // The oldest protocol has no stdin to speak of: its server closes it at once.
    if matches!(protocol, "" | "channel.k8s.io") {
        s.stdin = None;
    }
    // Later streams (a client opening more than it should) are refused.
    tokio::spawn(async move {
        while let Some(extra) = incoming.recv().await {
            conn.refuse(extra, spdy::REFUSED_STREAM).await;
        }
    });
    Ok(s)
}

/// A WebSocket session: the channels exist as soon as the connection does.
pub(crate) async fn ws_session<IO>(ws: tokio_tungstenite::WebSocketStream<IO>, protocol: &str, opts: Options) -> Session
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let framing = Framing::of(protocol);
    let mut readable = vec![RESIZE];
    if opts.stdin {
        readable.push(STDIN);
    }
    let (channels, mut rx) = Channels::start(ws, framing, &readable);
    let s = Session {
        stdin: rx.remove(&STDIN),
        stdout: opts.stdout.then(|| Out::Ws(channels.sender(STDOUT))),
        stderr: opts.stderr.then(|| Out::Ws(channels.sender(STDERR))),
        error: Some(Out::Ws(channels.sender(ERROR))),
        resize: if opts.tty { rx.remove(&RESIZE) } else { None },
        json_status: framing.json_status,
        tty: opts.tty,
        conn: Conn::Ws(channels),
    };
    // An empty message on the lowest writable channel tells the client the session is up.
    let first = s.stdout.as_ref().or(s.stderr.as_ref()).or(s.error.as_ref());
    if let Some(out) = first {
        let _ = out.send(Bytes::new()).await;
    }
    s
}

/// What the error stream says at the end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Success,
    /// The command ran and exited with this code (not 0); the text describes the command.
    ExitCode(i32, String),
    /// It could not be run.
    Failure(String),
}

impl Status {
    /// The metav1.Status JSON of protocols v4 and later.
    pub fn json(&self) -> String {
        let v = match self {
            Status::Success => json!({"metadata": {}, "status": "Success"}),
            Status::ExitCode(code, what) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {what}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Status::Failure(msg) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: {msg}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": msg}]},
                "code": 500,
            }),
        };
        v.to_string()
    }

    /// The plain text older protocols carry (nothing on success).
    pub fn text(&self) -> Option<String> {
        match self {
            Status::Success => None,
            Status::ExitCode(_, what) => Some(format!("command terminated with non-zero exit code: {what}")),
            Status::Failure(msg) => Some(format!("Internal error occurred: {msg}")),
        }
    }
}

/// What the session runs.
#[derive(Debug, Clone)]
pub(crate) enum Call {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

impl Call {
    /// The streams the request asked for.
    pub(crate) fn options(&self) -> Options {
        match self {
            Call::Exec(r) => Options { stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, tty: r.tty },
            Call::Attach(r) => Options { stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, tty: r.tty },
        }
    }
}

/// Runs the session: pumps the streams, calls the backend, reports the status, closes. When the
/// client goes away first, the backend's future is dropped (which stops what it runs).
pub(crate) async fn run(mut s: Session, backend: Arc<dyn Backend>, call: Call) {
    let mut pumps = Vec::new();
    let stdin = s.stdin.take().map(|mut rx| {
        // A duplex end ends the other's reads when it is dropped (a simplex half does not).
        let (r, mut w) = tokio::io::duplex(PIPE);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        Box::new(r) as crate::Reader
    });
    let mut output = |out: Option<Out>| {
        out.map(|out| {
            let (mut r, w) = tokio::io::duplex(PIPE);
            pumps.push(tokio::spawn(async move {
                let mut buf = bytes::BytesMut::new();
                let mut open = true;
                loop {
                    match crate::spdy::read_chunk(&mut r, &mut buf).await {
                        Ok(None) | Err(_) => break,
                        // A stream the client closed still drains, so the backend never waits.
                        Ok(Some(chunk)) if open => open = out.send(chunk).await.is_ok(),
                        Ok(Some(_)) => {}
                    }
                }
                let _ = out.finish().await;
            }));
            Box::new(w) as crate::Writer
        })
    };
    let stdout = output(s.stdout.take());
    let stderr = output(s.stderr.take());
    let resize = s.resize.take().map(|rx| {
        let (tx, sizes) = mpsc::channel(4);
        tokio::spawn(decode_sizes(rx, tx));
        sizes
    });
    let io = Stdio { stdin, stdout, stderr, tty: s.tty, resize };
    let work = async {
        match &call {
            Call::Exec(req) => match backend.exec(req, io).await {
                Ok(0) => Status::Success,
                Ok(code) => {
                    Status::ExitCode(code, format!("error executing command {}, exit code {code}", go_list(&req.cmd)))
                }
                Err(e) => Status::Failure(format!("error executing command in container: {e}")),
            },
            Call::Attach(req) => match backend.attach(req, io).await {
                Ok(()) => Status::Success,
                Err(e) => Status::Failure(format!("error attaching to container {}: {e}", req.container_id)),
            },
        }
    };
    let status = tokio::select! {
        status = work => status,
        _ = s.conn.closed() => {
            tracing::info!("streaming client went away; its session is stopped");
            return;
        }
    };
    // Everything the backend wrote reaches the client before the status does.
    for p in pumps {
        let _ = p.await;
    }
    if let Some(err) = &s.error {
        let body = if s.json_status { Some(status.json()) } else { status.text() };
        if let Some(body) = body {
            let _ = err.send(Bytes::from(body)).await;
        }
        let _ = err.finish().await;
    }
    s.conn.close().await;
}

/// Go's `%v` of a string slice: `[sh -c exit 3]`.
fn go_list(v: &[String]) -> String {
    format!("[{}]", v.join(" "))
}

/// Reads the resize stream's JSON objects (one after another, cut anywhere) into sizes.
async fn decode_sizes(mut rx: mpsc::Receiver<Bytes>, tx: mpsc::Sender<TermSize>) {
    let mut buf = Vec::new();
    while let Some(b) = rx.recv().await {
        buf.extend_from_slice(&b);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    used = it.byte_offset();
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a resize message is not a terminal size; ignoring the stream");
                    return;
                }
                None => {
                    used = buf.len();
                    break;
                }
            }
        }
        buf.drain(..used);
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_the_kubelets() {
        assert_eq!(Status::Success.json(), r#"{"metadata":{},"status":"Success"}"#);
        let v: serde_json::Value = serde_json::from_str(
            &Status::ExitCode(3, "error executing command [sh -c exit 3], exit code 3".into()).json(),
        )
        .unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert_eq!(
            v["message"],
            "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3"
        );
        let v: serde_json::Value = serde_json::from_str(&Status::Failure("no such file".into()).json()).unwrap();
        assert_eq!(v["code"], 500);
        assert_eq!(v["reason"], "InternalError");
        assert_eq!(Status::Success.text(), None);
        assert_eq!(go_list(&["sh".into(), "-c".into(), "exit 3".into()]), "[sh -c exit 3]");
    }

    #[tokio::test]
    async fn sizes_are_decoded_across_message_boundaries() {
        let (tx, rx) = mpsc::channel(8);
        let (stx, mut srx) = mpsc::channel(8);
        let task = tokio::spawn(decode_sizes(rx, stx));
        tx.send(Bytes::from_static(br#"{"Width":80,"Hei"#)).await.unwrap();
        tx.send(Bytes::from_static(br#"ght":24}{"Width":100,"Height":40}"#)).await.unwrap();
        assert_eq!(srx.recv().await, Some(TermSize { width: 80, height: 24 }));
        assert_eq!(srx.recv().await, Some(TermSize { width: 100, height: 40 }));
        drop(tx);
        task.await.unwrap();
        assert_eq!(srx.recv().await, None);
    }
}
