//! The HTTP side: single-use URLs for cached requests, and the upgrade to SPDY or WebSocket.
//!
//! As the kubelet's streaming server: a request is cached under a random token for one minute,
//! at most 1,000 wait at a time, a token is consumed by its first use, and an unknown, used or
//! expired one is a 404. The client must open its streams within 30 s of the upgrade.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use crate::channels::{self, negotiate};
use crate::remotecommand::{self, Call, SPDY_EXEC_PROTOCOLS};
use crate::{AttachRequest, Backend, Error, ExecRequest, PortForwardRequest, portforward, spdy};

/// Streaming server settings (the kubelet's streaming.Config defaults).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen; port 0 picks one.
    pub addr: SocketAddr,
    /// How long a URL stays usable.
    pub request_ttl: Duration,
    /// How many unused URLs may wait at once.
    pub max_in_flight: usize,
    /// How long a client has to open its streams after the upgrade.
    pub stream_creation_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            request_ttl: Duration::from_secs(60),
            max_in_flight: 1000,
            stream_creation_timeout: Duration::from_secs(30),
        }
    }
}

enum Cached {
    Session(Call),
    PortForward(PortForwardRequest),
}

impl Cached {
    fn path(&self) -> &'static str {
        match self {
            Cached::Session(Call::Exec(_)) => "exec",
            Cached::Session(Call::Attach(_)) => "attach",
            Cached::PortForward(_) => "portforward",
        }
    }
}

struct Inner {
    cfg: Config,
    base: String,
    backend: Arc<dyn Backend>,
    cache: Mutex<HashMap<String, (Instant, Cached)>>,
}

/// A running streaming server.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Binds `cfg.addr` and serves on the current tokio runtime.
    pub async fn start(cfg: Config, backend: Arc<dyn Backend>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let base = format!("http://{addr}");
        let inner = Arc::new(Inner { cfg, base, backend, cache: Mutex::default() });
        tracing::info!(address = %addr, "streaming server listening");
        let accept = inner.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let inner = accept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(inner, req)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "streaming HTTP connection ended");
                    }
                });
            }
        });
        Ok(Server { inner })
    }

    /// `http://ADDR` of the server.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// The URL for an Exec request, checked as the kubelet checks it.
    pub fn exec_url(&self, req: ExecRequest) -> Result<String, Error> {
        if req.container_id.is_empty() {
            return Err(Error::InvalidRequest("missing required container_id".into()));
        }
        if req.cmd.is_empty() {
            return Err(Error::InvalidRequest(format!("exec in container {}: empty command", req.container_id)));
        }
        check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        self.insert(Cached::Session(Call::Exec(req)))
    }

    /// The URL for an Attach request.
    pub fn attach_url(&self, req: AttachRequest) -> Result<String, Error> {
        if req.container_id.is_empty() {
            return Err(Error::InvalidRequest("missing required container_id".into()));
        }
        check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        self.insert(Cached::Session(Call::Attach(req)))
    }

    /// The URL for a PortForward request.
    pub fn port_forward_url(&self, req: PortForwardRequest) -> Result<String, Error> {
        if req.sandbox_id.is_empty() {
            return Err(Error::InvalidRequest("missing required pod_sandbox_id".into()));
        }
        self.insert(Cached::PortForward(req))
    }

    fn insert(&self, req: Cached) -> Result<String, Error> {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        cache.retain(|_, (expires, _)| *expires > now);
        if cache.len() >= self.inner.cfg.max_in_flight {
            return Err(Error::TooManyRequests(self.inner.cfg.max_in_flight));
        }
        let token = loop {
            let bytes: [u8; 16] = rand::random();
            let t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if !cache.contains_key(&t) {
                break t;
            }
        };
        let url = format!("{}/{}/{token}", self.inner.base, req.path());
        cache.insert(token, (now + self.inner.cfg.request_ttl, req));
        Ok(url)
    }
}

fn check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), Error> {
    if tty && stderr {
        return Err(Error::InvalidRequest("tty and stderr cannot both be true".into()));
    }
    if !stdin && !stdout && !stderr {
        return Err(Error::InvalidRequest("one of stdin, stdout, or stderr must be set".into()));
    }
    Ok(())
}

fn plain(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("a valid header"));
    r
}

/// All values of a header, comma lists split.
fn values(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn has_token(h: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    values(h, name.as_str()).iter().any(|v| v.eq_ignore_ascii_case(token))
}

fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let path = req.uri().path().trim_matches('/').to_string();
    let Some((kind, token)) = path.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    // Consumed on first use, whatever happens next.
    let cached = {
        let mut cache = inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.remove(token) {
            Some((expires, c)) if expires > Instant::now() && c.path() == kind => Some(c),
            _ => None,
        }
    };
    let Some(cached) = cached else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    let h = req.headers();
    let websocket = has_token(h, header::UPGRADE, "websocket") && has_token(h, header::CONNECTION, "upgrade");
    let spdy = has_token(h, header::UPGRADE, "SPDY/3.1");
    if websocket {
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec()) else {
            return plain(StatusCode::BAD_REQUEST, "unable to upgrade: missing Sec-WebSocket-Key");
        };
        let supported = if matches!(cached, Cached::PortForward(_)) {
            channels::PORT_FORWARD_PROTOCOLS
        } else {
            channels::EXEC_PROTOCOLS
        };
        let offered = values(h, "sec-websocket-protocol");
        let Some(protocol) = negotiate(&offered, supported) else {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("requested protocol(s) are not supported: {offered:?}; supports {supported:?}"),
            );
        };
        let ports = match &cached {
            Cached::PortForward(_) if protocol != channels::SPDY_TUNNEL => {
                match portforward::query_ports(req.uri().query().unwrap_or("")) {
                    Ok(p) => p,
                    Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
                }
            }
            _ => Vec::new(),
        };
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let rh = resp.headers_mut();
        rh.insert(header::UPGRADE, "websocket".parse().expect("a valid header"));
        rh.insert(header::CONNECTION, "Upgrade".parse().expect("a valid header"));
        rh.insert(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key).parse().expect("a valid header"));
        if !protocol.is_empty() {
            rh.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.parse().expect("a valid header"));
        }
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "WebSocket upgrade failed"),
            };
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, None).await;
            let backend = inner.backend.clone();
            let timeout = inner.cfg.stream_creation_timeout;
            match cached {
                Cached::PortForward(pf) if protocol == channels::SPDY_TUNNEL => {
                    let (conn, incoming) = spdy::Connection::start(channels::Tunnel::new(ws), spdy::Role::Server);
                    portforward::serve_spdy(conn, incoming, backend, pf.sandbox_id, timeout).await
                }
                Cached::PortForward(pf) => portforward::serve_ws(ws, &protocol, ports, backend, pf.sandbox_id).await,
                Cached::Session(call) => {
                    let opts = call.options();
                    let s = remotecommand::ws_session(ws, &protocol, opts).await;
                    remotecommand::run(s, backend, call).await;
                }
            }
        });
        return resp;
    }
    if !spdy {
        return plain(StatusCode::BAD_REQUEST, "unable to upgrade: missing upgrade headers in request");
    }
    let supported =
        if matches!(cached, Cached::PortForward(_)) { portforward::SPDY_PROTOCOLS } else { SPDY_EXEC_PROTOCOLS };
    let offered = values(h, "x-stream-protocol-version");
    let protocol = if offered.is_empty() {
        String::new()
    } else {
        match offered.iter().find(|p| supported.contains(&p.as_str())) {
            Some(p) => p.clone(),
            None => {
                let mut r = plain(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
                    ),
                );
                for s in supported {
                    r.headers_mut().append("X-Accepted-Stream-Protocol-Versions", s.parse().expect("a valid header"));
                }
                return r;
            }
        }
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let rh = resp.headers_mut();
    rh.insert(header::CONNECTION, "Upgrade".parse().expect("a valid header"));
    rh.insert(header::UPGRADE, "SPDY/3.1".parse().expect("a valid header"));
    if !protocol.is_empty() {
        rh.insert("X-Stream-Protocol-Version", protocol.parse().expect("a valid header"));
    }
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => return tracing::debug!(error = %e, "SPDY upgrade failed"),
        };
        let (conn, incoming) = spdy::Connection::start(TokioIo::new(upgraded), spdy::Role::Server);
        let backend = inner.backend.clone();
        let timeout = inner.cfg.stream_creation_timeout;
        match cached {
            Cached::PortForward(pf) => portforward::serve_spdy(conn, incoming, backend, pf.sandbox_id, timeout).await,
            Cached::Session(call) => {
                let opts = call.options();
                match remotecommand::spdy_session(conn.clone(), incoming, &protocol, opts, timeout).await {
                    Ok(s) => remotecommand::run(s, backend, call).await,
                    Err(e) => {
                        tracing::info!(error = %e, "streaming session not set up");
                        conn.close().await;
                    }
                }
            }
        }
    });
    resp
}
