//! Running probes and hook handlers against a pod: exec through the CRI's ExecSync, httpGet,
//! tcpSocket and grpc over sockets made inside the pod's network namespace when it has one of
//! its own (rootless pods are reachable only from there), else to the pod IP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Container, ExecAction, GRPCAction, HTTPGetAction, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::actions::go_duration;
use super::cri::{RuntimeClient, SandboxNetwork};
use super::env::expand_probe_command;
use super::http1;
use super::probe::Outcome;

/// The most of a probe's output (or HTTP body) kept.
pub use super::http1::MAX_OUTPUT;

/// Where the pod is.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub net: SandboxNetwork,
    /// The container's ID (exec).
    pub container_id: String,
}

/// A dial error as Go's prober words it.
fn dial_error(addr: SocketAddr, e: &std::io::Error) -> String {
    wasmlet_streaming::go_dial_error("tcp", addr, e)
}

/// A socket connected to `addr` from inside the namespace at `netns` (or from here).
pub async fn connect(
    netns: Option<&str>,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match netns {
        None => {
            if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            }
        }
        // On the probers' thread, which runs nothing else, the socket is made right here;
        // elsewhere (hooks) it comes from the dialer thread.
        Some(path) => match PROBER_THREAD_NETNS.with(|current| {
            let mut current = current.borrow_mut();
            current.as_mut().map(|current| socket_in(path, addr.is_ipv4(), current))
        }) {
            Some(made) => tokio::net::TcpSocket::from_std_stream(made?),
            None => tokio::net::TcpSocket::from_std_stream(dial_thread(path.to_string(), addr.is_ipv4()).await?),
        },
    };
    let made = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    };
    made.map_err(|e| std::io::Error::new(e.kind(), dial_error(addr, &e)))
}

thread_local! {
    /// On the probers' thread: the inode of the network namespace it is in (0: its own).
    /// Elsewhere None: no other thread of the kubelet may leave its namespace.
    static PROBER_THREAD_NETNS: std::cell::RefCell<Option<u64>> = const { std::cell::RefCell::new(None) };
}

/// Runs `fut` on the probers' thread: one thread with a runtime of its own, where the probe
/// tasks tick, dial and read, so that a probe crosses no thread (a socket inside a pod's
/// namespace is made with one `setns` on the spot) and the probes' CPU is on one thread.
/// Unit tests run them on the test's own runtime instead, so they share its (paused) clock.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    if cfg!(test) {
        return tokio::spawn(fut);
    }
    static PROBERS: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    PROBERS
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("probers' runtime");
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name("probers".into())
                .spawn(move || {
                    PROBER_THREAD_NETNS.with(|c| *c.borrow_mut() = Some(0));
                    rt.block_on(std::future::pending::<()>());
                })
                .expect("start the probers' thread");
            handle
        })
        .spawn(fut)
}

type DialRequest = (String, bool, tokio::sync::oneshot::Sender<std::io::Result<std::net::TcpStream>>);

/// Sockets inside pods' namespaces for code off the probers' thread (hooks) come from one
/// thread of its own, which moves from pod to pod (it never runs anything else, so it need not
/// go back).
async fn dial_thread(netns: String, v4: bool) -> std::io::Result<std::net::TcpStream> {
    static DIALER: std::sync::OnceLock<std::sync::mpsc::Sender<DialRequest>> = std::sync::OnceLock::new();
    let tx = DIALER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<DialRequest>();
        let spawned = std::thread::Builder::new().name("netns-dialer".into()).spawn(move || {
            let mut current = 0u64;
            for (path, v4, reply) in rx {
                let _ = reply.send(socket_in(&path, v4, &mut current));
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "start the netns dialer thread");
        }
        tx
    });
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send((netns, v4, reply)).map_err(|_| std::io::Error::other("the netns dialer thread is gone"))?;
    answer.await.map_err(|_| std::io::Error::other("the netns dialer thread is gone"))?
}

/// A TCP socket created inside the namespace at `netns`, from a thread that runs nothing
/// else (the probers' or the dialer), which is in the namespace with inode `current` (0: its
/// own) and stays where it moves.
fn socket_in(netns: &str, v4: bool, current: &mut u64) -> std::io::Result<std::net::TcpStream> {
    use rustix::fs::{Mode, OFlags, open};
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    use std::os::fd::AsFd;
    let pod = open(netns, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let ino = rustix::fs::fstat(&pod)?.st_ino;
    if ino != *current {
        move_into_link_name_space(pod.as_fd(), Some(LinkNameSpaceType::Network))?;
        *current = ino;
    }
    let family = if v4 { rustix::net::AddressFamily::INET } else { rustix::net::AddressFamily::INET6 };
    let made = rustix::net::socket_with(
        family,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )?;
    Ok(std::net::TcpStream::from(made))
}

/// A probe or handler port: a number, or a name among the container's ports.
pub fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)) {
            Some(p) => p.container_port,
            None => name.parse().map_err(|_| format!("couldn't find port: {name} in {}", c.name))?,
        },
    };
    if !(1..=65535).contains(&n) {
        return Err(format!("invalid port number: {n}"));
    }
    Ok(n as u16)
}

fn host_ip(host: Option<&str>, target: &Target) -> Result<IpAddr, String> {
    let host = host.filter(|h| !h.is_empty()).unwrap_or_else(|| target.net.address());
    host.parse().map_err(|_| format!("cannot resolve host {host:?}: only IP addresses are supported"))
}

/// The address a probe or handler dials: its host (default the pod IP) and its port.
fn endpoint(port: &IntOrString, host: Option<&str>, c: &Container, target: &Target) -> Result<(IpAddr, u16), String> {
    let port = resolve_port(port, c)?;
    Ok((host_ip(host, target)?, port))
}

/// The namespace to dial from: the pod's, when the target is the pod's own address.
fn dial_ns(ip: IpAddr, target: &Target) -> Option<&str> {
    (ip.to_string() == target.net.address()).then_some(target.net.netns.as_deref()).flatten()
}

/// A probe's result and the message that goes with it.
pub type Result2 = (Outcome, String);

/// exec: ExecSync with the probe's timeout; exit 0 is success.
pub async fn exec(
    cri: &dyn RuntimeClient,
    target: &Target,
    action: &ExecAction,
    c: &Container,
    timeout: Duration,
) -> Result2 {
    let cmd = expand_probe_command(action.command.as_deref().unwrap_or_default(), c);
    match cri.exec_sync(&target.container_id, cmd.clone(), timeout).await {
        Ok(r) => {
            let mut out = r.stdout;
            out.extend_from_slice(&r.stderr);
            out.truncate(MAX_OUTPUT);
            let out = String::from_utf8_lossy(&out).into_owned();
            if r.exit_code == 0 {
                (Outcome::Success, out)
            } else if out.is_empty() {
                (Outcome::Failure, format!("command {cmd:?} exited with {}", r.exit_code))
            } else {
                (Outcome::Failure, out)
            }
        }
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
            (Outcome::Failure, format!("command \"{}\" timed out", cmd.join(" ")))
        }
        Err(s) => (Outcome::Unknown, s.message().to_string()),
    }
}

/// tcpSocket: connecting within the timeout is success.
pub async fn tcp(target: &Target, action: &TCPSocketAction, c: &Container, timeout: Duration) -> Result2 {
    let (ip, port) = match endpoint(&action.port, action.host.as_deref(), c, target) {
        Ok(e) => e,
        Err(e) => return (Outcome::Unknown, e),
    };
    let addr = SocketAddr::new(ip, port);
    match connect(dial_ns(ip, target), addr, timeout).await {
        Ok(_) => (Outcome::Success, String::new()),
        Err(e) => (Outcome::Failure, e.to_string()),
    }
}

/// The User-Agent of probes (`kube-probe/1.36`) and hooks (`kube-lifecycle/1.36`).
pub const PROBE_AGENT: &str = "kube-probe/1.36";
pub const LIFECYCLE_AGENT: &str = "kube-lifecycle/1.36";

/// One GET on a fresh connection (TLS when `https`), without keep-alive; returns the status,
/// the Location header and at most 10 KiB of the body.
#[allow(clippy::too_many_arguments)]
async fn get_once(
    target: &Target,
    https: bool,
    ip: IpAddr,
    port: u16,
    host_header: &str,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> std::io::Result<(u16, Option<String>, String)> {
    let addr = SocketAddr::new(ip, port);
    let url = format!("{}://{addr}{path}", if https { "https" } else { "http" });
    let work = async {
        let stream = connect(dial_ns(ip, target), addr, timeout)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("Get \"{url}\": {e}")))?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        http1::send(stream, https.then_some(ip), req.as_bytes())
            .await
            .map(|a| (a.status, a.location, a.body))
            .map_err(|e| std::io::Error::new(e.kind(), format!("Get \"{url}\": {e}")))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"),
        )),
    }
}

/// The request headers of an httpGet probe or hook: the given ones (an empty value removes
/// one), plus User-Agent and Accept unless given.
fn request_headers(action: &HTTPGetAction, agent: &str) -> (Vec<(String, String)>, Option<String>) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut host = None;
    for h in action.http_headers.iter().flatten() {
        if h.name.eq_ignore_ascii_case("host") {
            host = Some(h.value.clone());
            continue;
        }
        headers.push((h.name.clone(), h.value.clone()));
    }
    for (name, default) in [("User-Agent", agent), ("Accept", "*/*")] {
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            headers.push((name.to_string(), default.to_string()));
        }
    }
    headers.retain(|(_, v)| !v.is_empty());
    (headers, host)
}

/// httpGet for probes: 200-399 is success; redirects are followed to the same host only (at
/// most 10), a redirect elsewhere is a warning.
pub async fn http_probe(target: &Target, action: &HTTPGetAction, c: &Container, timeout: Duration) -> Result2 {
    let mut https = action.scheme.as_deref() == Some("HTTPS");
    let (ip, port) = match endpoint(&action.port, action.host.as_deref(), c, target) {
        Ok(e) => e,
        Err(e) => return (Outcome::Unknown, e),
    };
    let (headers, host) = request_headers(action, PROBE_AGENT);
    let host_header = host.unwrap_or_else(|| SocketAddr::new(ip, port).to_string());
    let mut path = action.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    for _ in 0..=10 {
        let (status, location, body) =
            match get_once(target, https, ip, port, &host_header, &path, &headers, timeout).await {
                Ok(r) => r,
                Err(e) => return (Outcome::Failure, e.to_string()),
            };
        if (300..400).contains(&status)
            && let Some(loc) = location
        {
            // Same host: a path, or an absolute URL naming the same host.
            let same = if loc.starts_with('/') {
                Some(loc.clone())
            } else {
                loc.parse::<http::Uri>().ok().and_then(|u| {
                    let h = u.host()?.trim_matches(['[', ']']);
                    (h == host_header
                        .rsplit_once(':')
                        .map_or(host_header.as_str(), |(h, _)| h)
                        .trim_matches(['[', ']'])
                        || h == ip.to_string())
                    .then(|| {
                        https = u.scheme_str().map_or(https, |s| s.eq_ignore_ascii_case("https"));
                        u.path_and_query().map_or("/".into(), |p| p.to_string())
                    })
                })
            };
            match same {
                Some(p) => {
                    path = p;
                    continue;
                }
                None => return (Outcome::Warning, format!("Probe terminated redirects, Response body: {body}")),
            }
        }
        return if (200..400).contains(&status) {
            (Outcome::Success, body)
        } else {
            (Outcome::Failure, format!("HTTP probe failed with statuscode: {status}"))
        };
    }
    (Outcome::Failure, "stopped after 10 redirects".into())
}

/// httpGet for hooks: any HTTP response is success; only transport errors fail.
pub async fn http_hook(
    target: &Target,
    action: &HTTPGetAction,
    c: &Container,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let (ip, port) = endpoint(&action.port, action.host.as_deref(), c, target)?;
    let (mut headers, host) = request_headers(action, LIFECYCLE_AGENT);
    let host_header = host.unwrap_or_else(|| SocketAddr::new(ip, port).to_string());
    let path = action.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
    let https = action.scheme.as_deref() == Some("HTTPS");
    match get_once(target, https, ip, port, &host_header, &path, &headers, timeout).await {
        Ok(_) => Ok(None),
        // An HTTPS hook answered in plain HTTP is retried as HTTP, without Authorization; the
        // fallback is reported when the retry gets an answer.
        Err(e) if https && e.to_string().contains("server gave HTTP response to HTTPS client") => {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
            get_once(target, false, ip, port, &host_header, &path, &headers, timeout)
                .await
                .map_err(|_| e.to_string())?;
            Ok(Some(format!(
                "request to HTTPS lifecycle hook {} got HTTP response, retry with HTTP succeeded",
                SocketAddr::new(ip, port)
            )))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// grpc: `grpc.health.v1.Health/Check` in plaintext to the pod IP; only SERVING (1) passes.
/// The messages are the kubelet's. Like its blocking dial, a failed connection is retried
/// (grpc-go's back-off: 1 s, growing 1.6 times) until the timeout.
pub async fn grpc(target: &Target, action: &GRPCAction, timeout: Duration) -> Result2 {
    let ip = match host_ip(None, target) {
        Ok(ip) => ip,
        Err(e) => return (Outcome::Unknown, e),
    };
    if !(1..=65535).contains(&action.port) {
        return (Outcome::Unknown, format!("invalid port number: {}", action.port));
    }
    let addr = SocketAddr::new(ip, action.port as u16);
    let deadline = tokio::time::Instant::now() + timeout;
    let within = go_duration(timeout);
    let dial = async {
        let mut backoff = Duration::from_secs(1);
        loop {
            if let Ok(stream) = connect(dial_ns(ip, target), addr, timeout).await
                && let Ok((sender, conn)) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(stream),
                )
                .await
            {
                return (sender, tokio::spawn(conn));
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.mul_f64(1.6);
        }
    };
    let Ok((mut sender, conn)) = tokio::time::timeout_at(deadline, dial).await else {
        return (
            Outcome::Failure,
            format!("timeout: failed to connect service \"{addr}\" within {within}: context deadline exceeded"),
        );
    };
    let service = action.service.clone().unwrap_or_default();
    let call = async {
        let msg = prost::Message::encode_to_vec(&HealthCheckRequest { service });
        let mut body = Vec::with_capacity(5 + msg.len());
        body.push(0);
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", PROBE_AGENT)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RpcError::unavailable(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| RpcError::unavailable(e.to_string()))?;
        let head = resp.headers().clone();
        let collected = resp.into_body().collect().await.map_err(|e| RpcError::unavailable(e.to_string()))?;
        // A gRPC status comes in the trailers, or in the headers of a trailers-only answer.
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers.get(name).or_else(|| head.get(name)).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let code = field("grpc-status").and_then(|c| c.parse().ok()).unwrap_or(2);
        if code != 0 {
            return Err(RpcError { code, message: field("grpc-message").unwrap_or_default() });
        }
        let data = collected.to_bytes();
        let payload = data.get(5..).ok_or_else(|| RpcError { code: 13, message: "empty response".into() })?;
        let r = <HealthCheckResponse as prost::Message>::decode(payload).map_err(|e| RpcError {
            code: 13,
            message: format!("grpc: failed to unmarshal the received message: {e}"),
        })?;
        Ok(r.status)
    };
    let result = tokio::time::timeout_at(deadline, call).await;
    conn.abort();
    match result {
        Ok(Ok(1)) => (Outcome::Success, String::new()),
        Ok(Ok(status)) => {
            (Outcome::Failure, format!("service unhealthy (responded with \"{}\")", health_status(status)))
        }
        Ok(Err(RpcError { code: 12, message })) => (
            Outcome::Failure,
            format!(
                "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {message}"
            ),
        ),
        Ok(Err(RpcError { code: 4, .. })) | Err(_) => {
            (Outcome::Failure, format!("timeout: health rpc did not complete within {within}"))
        }
        Ok(Err(e)) => (
            Outcome::Failure,
            format!("error: health rpc probe failed: rpc error: code = {} desc = {}", grpc_code(e.code), e.message),
        ),
    }
}

/// A gRPC call's failure: its status code and message.
struct RpcError {
    code: i32,
    message: String,
}

impl RpcError {
    fn unavailable(message: String) -> RpcError {
        RpcError { code: 14, message }
    }
}

/// grpc.health.v1's ServingStatus as Go's String() names it.
fn health_status(status: i32) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => n.to_string(),
    }
}

/// A gRPC status code as grpc-go's codes.Code String() names it.
fn grpc_code(code: i32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code).ok().and_then(|i| NAMES.get(i)).map_or_else(|| format!("Code({code})"), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPHeader};
    use std::sync::Arc;

    #[test]
    fn dial_errors_read_like_go() {
        let a: SocketAddr = "10.88.0.2:80".parse().unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(dial_error(a, &refused), "dial tcp 10.88.0.2:80: connect: connection refused");
        let t = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(dial_error(a, &t), "dial tcp 10.88.0.2:80: i/o timeout");
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_listeners() {
        // A listener on the host's loopback, reached without a namespace.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let reply = match path.as_str() {
                        "/ok" => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
                        "/agent" => {
                            let agent = req
                                .lines()
                                .find(|l| l.to_lowercase().starts_with("user-agent:"))
                                .unwrap_or("")
                                .to_string();
                            let code = if agent.ends_with(PROBE_AGENT) { 200 } else { 500 };
                            format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n")
                        }
                        "/hop" => "HTTP/1.1 302 Found\r\nlocation: /ok\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "/away" => {
                            "HTTP/1.1 301 Moved\r\nlocation: http://elsewhere.example/\r\ncontent-length: 4\r\n\r\nbody"
                                .to_string()
                        }
                        _ => "HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n".to_string(),
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        let target = Target {
            net: SandboxNetwork { ip: "127.0.0.1".into(), netns: None, inside: None },
            container_id: String::new(),
        };
        let c = Container::default();
        let get = |path: &str| HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        };
        let t = Duration::from_secs(2);
        assert_eq!(http_probe(&target, &get("/ok"), &c, t).await.0, Outcome::Success);
        // No pod IP reported (rootless): the probe dials the pod's address inside its namespace.
        let inside = SandboxNetwork { ip: String::new(), netns: None, inside: Some("127.0.0.1".into()) };
        let rootless = Target { net: inside, container_id: String::new() };
        assert_eq!(http_probe(&rootless, &get("/ok"), &c, t).await.0, Outcome::Success);
        let nothing = Target { net: SandboxNetwork::default(), container_id: String::new() };
        assert_eq!(http_probe(&nothing, &get("/ok"), &c, t).await.0, Outcome::Unknown, "no address at all");
        assert_eq!(http_probe(&target, &get("/agent"), &c, t).await.0, Outcome::Success);
        assert_eq!(http_probe(&target, &get("/hop"), &c, t).await.0, Outcome::Success, "same-host redirect followed");
        let (o, msg) = http_probe(&target, &get("/away"), &c, t).await;
        assert_eq!((o, msg.as_str()), (Outcome::Warning, "Probe terminated redirects, Response body: body"));
        let (o, msg) = http_probe(&target, &get("/down"), &c, t).await;
        assert_eq!((o, msg.as_str()), (Outcome::Failure, "HTTP probe failed with statuscode: 503"));
        let tcp_ok = TCPSocketAction { port: IntOrString::Int(i32::from(port)), ..Default::default() };
        assert_eq!(tcp(&target, &tcp_ok, &c, t).await.0, Outcome::Success);
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let tcp_closed = TCPSocketAction { port: IntOrString::Int(i32::from(closed)), ..Default::default() };
        let (o, msg) = tcp(&target, &tcp_closed, &c, t).await;
        assert_eq!((o, msg), (Outcome::Failure, format!("dial tcp 127.0.0.1:{closed}: connect: connection refused")));
        let (o, msg) = http_probe(
            &target,
            &HTTPGetAction { port: IntOrString::Int(i32::from(closed)), ..Default::default() },
            &c,
            t,
        )
        .await;
        assert_eq!(o, Outcome::Failure);
        assert_eq!(
            msg,
            format!("Get \"http://127.0.0.1:{closed}/\": dial tcp 127.0.0.1:{closed}: connect: connection refused")
        );
        // Any response is a hook's success.
        assert_eq!(http_hook(&target, &get("/down"), &c, t).await, Ok(None));
    }

    /// A gRPC health server over h2c: SERVING for the service "", NOT_SERVING for "down",
    /// an UNIMPLEMENTED status for anything else.
    async fn health_server() -> u16 {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let asked = <HealthCheckRequest as prost::Message>::decode(&body[5..]).unwrap().service;
                    let (status, grpc) = match asked.as_str() {
                        "" => (1, "0"),
                        "down" => (2, "0"),
                        "broken" => (0, "13"),
                        _ => (0, "12"),
                    };
                    let msg = prost::Message::encode_to_vec(&HealthCheckResponse { status });
                    let mut data = vec![0];
                    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                    data.extend_from_slice(&msg);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", grpc.parse().unwrap());
                    trailers.insert("grpc-message", "no such service".parse().unwrap());
                    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                        vec![Ok(Frame::data(Bytes::from(data))), Ok(Frame::trailers(trailers))];
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(StreamBody::new(futures_util::stream::iter(frames)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        port
    }

    #[tokio::test]
    async fn grpc_probes_pass_only_serving() {
        let port = health_server().await;
        let target = Target {
            net: SandboxNetwork { ip: "127.0.0.1".into(), netns: None, inside: None },
            container_id: String::new(),
        };
        let t = Duration::from_secs(2);
        let action = |service: Option<&str>| GRPCAction { port: i32::from(port), service: service.map(str::to_string) };
        assert_eq!(grpc(&target, &action(None), t).await.0, Outcome::Success);
        let (o, msg) = grpc(&target, &action(Some("down")), t).await;
        assert_eq!((o, msg.as_str()), (Outcome::Failure, "service unhealthy (responded with \"NOT_SERVING\")"));
        let (o, msg) = grpc(&target, &action(Some("nope")), t).await;
        assert_eq!(
            (o, msg.as_str()),
            (
                Outcome::Failure,
                "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): no such service"
            )
        );
        let (o, msg) = grpc(&target, &action(Some("broken")), t).await;
        assert_eq!(
            (o, msg.as_str()),
            (Outcome::Failure, "error: health rpc probe failed: rpc error: code = Internal desc = no such service")
        );
        // A closed port is redialled until the timeout, as the kubelet's blocking dial does.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (o, msg) = grpc(&target, &GRPCAction { port: i32::from(closed), service: None }, t).await;
        assert_eq!(
            (o, msg),
            (
                Outcome::Failure,
                format!(
                    "timeout: failed to connect service \"127.0.0.1:{closed}\" within 2s: context deadline exceeded"
                )
            )
        );
    }

    /// An HTTPS server with a self-signed certificate (made by `openssl`) answering every
    /// connection with 200 "secure"; its port.
    async fn https_server(dir: &std::path::Path) -> u16 {
        use rustls::pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "1", "-subj", "/CN=pod", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    let mut got = Vec::new();
                    while !got.ends_with(b"\r\n\r\n") {
                        let mut b = [0u8; 512];
                        match tls.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&b[..n]),
                        }
                    }
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_probes_skip_verification_and_hooks_fall_back_to_http() {
        let tmp = tempfile::tempdir().unwrap();
        let secure = https_server(tmp.path()).await;
        let plain = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("plain"))))
                });
                loop {
                    let Ok((s, _)) = l.accept().await else { return };
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                    );
                }
            });
            port
        };
        let target = Target {
            net: SandboxNetwork { ip: "127.0.0.1".into(), netns: None, inside: None },
            container_id: String::new(),
        };
        let c = Container { name: "web".into(), ..Default::default() };
        let t = Duration::from_secs(2);
        let https = |port: u16| HTTPGetAction {
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTPS".into()),
            ..Default::default()
        };
        // A self-signed certificate is fine: the kubelet does not verify it.
        assert_eq!(http_probe(&target, &https(secure), &c, t).await, (Outcome::Success, "secure".into()));
        // An HTTPS probe to a plain HTTP server fails with Go's words.
        assert_eq!(
            http_probe(&target, &https(plain), &c, t).await,
            (
                Outcome::Failure,
                format!("Get \"https://127.0.0.1:{plain}/\": http: server gave HTTP response to HTTPS client")
            )
        );
        // An HTTPS hook to it is retried as HTTP, and the fallback is reported.
        assert_eq!(http_hook(&target, &https(secure), &c, t).await, Ok(None));
        assert_eq!(
            http_hook(&target, &https(plain), &c, t).await,
            Ok(Some(format!(
                "request to HTTPS lifecycle hook 127.0.0.1:{plain} got HTTP response, retry with HTTP succeeded"
            )))
        );
    }

    #[test]
    fn ports_by_number_or_name() {
        let c = Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() }]),
            ..Default::default()
        };
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(resolve_port(&IntOrString::String("http".into()), &c), Ok(8080));
        assert_eq!(resolve_port(&IntOrString::String("9000".into()), &c), Ok(9000));
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(0), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    #[test]
    fn headers_add_agent_and_accept_unless_given_and_empty_removes() {
        let action = HTTPGetAction {
            http_headers: Some(vec![
                HTTPHeader { name: "X-A".into(), value: "1".into() },
                HTTPHeader { name: "X-A".into(), value: "2".into() },
                HTTPHeader { name: "Accept".into(), value: "".into() },
                HTTPHeader { name: "Host".into(), value: "example.com".into() },
            ]),
            ..Default::default()
        };
        let (h, host) = request_headers(&action, PROBE_AGENT);
        assert_eq!(host.as_deref(), Some("example.com"));
        assert_eq!(
            h,
            [
                ("X-A".to_string(), "1".to_string()),
                ("X-A".to_string(), "2".to_string()),
                ("User-Agent".to_string(), PROBE_AGENT.to_string())
            ]
        );
    }
}
