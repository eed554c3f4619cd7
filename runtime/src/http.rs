//! Serving `wasi:http/incoming-handler` components: HTTP/1.1 on the container's port inside the
//! pod's namespace, one fresh instance per request from the pre-instantiated component, and
//! the response streamed back as the guest writes it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::engine::{GuestMeter, GuestSpec, Limiter, P2State, build_wasi, prepare};
use crate::net::dns::LookupError;
use crate::net::egress::{ConnectError, Egress};

/// Where a handler component listens: the container's `PORT` variable, else `default`.
pub fn port(spec: &GuestSpec, default: u16) -> u16 {
    spec.env.iter().rev().find(|(k, _)| k == "PORT").and_then(|(_, v)| v.parse().ok()).unwrap_or(default)
}

/// What every request's instance is made from.
struct Server {
    engine: wasmtime::Engine,
    pre: ProxyPre<P2State>,
    /// The container's spec; its preopens are left out when the component imports no
    /// filesystem (the wasi:http/proxy world has none), which saves opening each directory
    /// for every request.
    spec: GuestSpec,
    meter: Arc<GuestMeter>,
}

/// Whether a component imports a wasi:filesystem interface.
fn imports_filesystem(engine: &wasmtime::Engine, component: &wasmtime::component::Component) -> bool {
    component.component_type().imports(engine).any(|(name, _)| name.starts_with("wasi:filesystem/"))
}

/// Binds a handler's listener (0.0.0.0 on its port) where the guest's sockets live: in the
/// pod's namespace, or the host's. None when the guest has no network (it binds when served).
pub fn bind(spec: &GuestSpec) -> crate::Result<Option<Arc<std::net::TcpListener>>> {
    let port = port(spec, 8080);
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let fail = |e: std::io::Error| crate::Error::FailedPrecondition(format!("wasi:http: listen on {addr}: {e}"));
    let listener = match &spec.net {
        crate::engine::GuestNet::Pod(ns) => ns.run_inside(move || std::net::TcpListener::bind(addr)).map_err(fail)?,
        crate::engine::GuestNet::Host => std::net::TcpListener::bind(addr).map_err(fail)?,
        crate::engine::GuestNet::None => return Ok(None),
    };
    Ok(Some(Arc::new(listener)))
}

/// Serves until a stop is requested (then stops accepting, lets the requests in flight finish
/// and returns Ok), dropped (a kill), or the listener fails (Err).
pub async fn serve(
    engine: wasmtime::Engine,
    pre: ProxyPre<P2State>,
    spec: GuestSpec,
    meter: Arc<GuestMeter>,
    port: u16,
) -> Result<(), String> {
    // Bound at StartContainer in the pod's namespace; else bound here, polled inside it.
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = match &spec.http_listener {
        Some(l) => {
            let l = l.try_clone().map_err(|e| format!("wasi:http: listener on {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| format!("wasi:http: listener on {addr}: {e}"))?;
            tokio::net::TcpListener::from_std(l).map_err(|e| format!("wasi:http: listener on {addr}: {e}"))?
        }
        None => tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("wasi:http: listen on {addr}: {e}"))?,
    };
    tracing::info!(%addr, "serving wasi:http");
    let mut stop = spec.stop.clone().unwrap_or_else(|| tokio::sync::watch::channel(false).1);
    let mut spec = spec;
    if !imports_filesystem(&engine, pre.instance_pre().component()) {
        spec.preopens.clear();
        spec.cwd = None;
    }
    let server = Arc::new(Server { engine, pre, spec, meter: meter.clone() });
    // Connections end with the server: the set aborts them when dropped.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| format!("wasi:http: accept: {e}"))?,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let netns = server.spec.net.netns();
        let mut stopping = stop.clone();
        let connection = async move {
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let conn = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                // (The borrow wait_for returns is dropped inside: it must not live across an await.)
                () = async { let _ = stopping.wait_for(|s| *s).await; } => {
                    // Finish the request in flight, take no more on this connection.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "wasi:http connection");
            }
        };
        // Parsing and writing HTTP is work done for the guest: it is charged to it, and waits
        // for its quota and its turn at a core as the guest's own code does.
        let connection = crate::cpu::Metered::new(meter.clone(), connection);
        // The guest's own sockets, if it opens any while handling, must be the pod's too.
        match netns {
            Some(ns) => connections.spawn(async move {
                let _ = crate::net::InNetns::new(ns, connection).await;
            }),
            None => connections.spawn(connection),
        };
    }
    // Stopping: the listener closes now; the requests in flight finish.
    drop(listener);
    tracing::info!(%addr, in_flight = connections.len(), "wasi:http stopping");
    while connections.join_next().await.is_some() {}
    Ok(())
}

impl Server {
    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<HyperOutgoingBody> {
        match self.run(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "wasi:http request failed");
                let body = http_body_util::Full::new(bytes::Bytes::from("500 Internal Server Error\n"));
                use http_body_util::BodyExt;
                let body = body.map_err(|never: Infallible| match never {}).boxed_unsync();
                let mut r = hyper::Response::new(body);
                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        }
    }

    async fn run(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>, String> {
        // Each request's instance is counted in the container, as an exec'd one is: its
        // memory while it lives, its CPU for good.
        let meter = Arc::new(GuestMeter::exec_in(self.meter.clone()));
        let mut wasi = build_wasi(&self.spec, &meter)?;
        let limiter = Limiter::new(meter.clone());
        let state = P2State::new(wasi.build(), limiter, &self.spec);
        let mut store = Store::new(&self.engine, state);
        prepare(&mut store, |s| s.limiter());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = store.data_mut().http().new_incoming_request(Scheme::Http, req).map_err(|e| e.to_string())?;
        let out = store.data_mut().http().new_response_outparam(tx).map_err(|e| e.to_string())?;
        let proxy = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| crate::engine::slot_hint(format!("instantiate: {e:#}")))?;
        // The guest keeps running (streaming the body) after it has set the response.
        let handle = async move { proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await };
        let task = tokio::spawn(crate::cpu::Metered::new(meter, handle));
        match rx.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(format!("the handler answered with an error: {code:?}")),
            Err(_) => {
                let why = match task.await {
                    Ok(Ok(())) => "the handler returned without a response".to_string(),
                    Ok(Err(e)) => format!("the handler trapped: {e:#}"),
                    Err(e) => format!("the handler task: {e}"),
                };
                Err(why)
            }
        }
    }
}

/// Outgoing requests (`wasi:http/outgoing-handler`), sent by wasmlet on the guest's behalf
/// through the pod's [`Egress`]: its names, its Services, the namespace that reaches the
/// destination. A guest with no network has its requests refused.
pub struct Hooks {
    pub egress: Option<Arc<Egress>>,
    /// The guest's meter: the CPU of its requests (the TLS handshake, the connection's I/O
    /// while the body streams) is the guest's, under its quota, as a process's own would be.
    pub meter: Arc<crate::engine::GuestMeter>,
}

/// How long a connection may take when the guest sets no connect timeout: a guest should not
/// wait minutes on an address that drops SYNs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The first byte and between bytes, when the guest sets none.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
)>;

impl wasmtime_wasi_http::WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let (egress, meter) = (self.egress.clone(), self.meter.clone());
        Box::new(crate::cpu::Metered::new(meter.clone(), async move {
            let Some(egress) = egress else { return Err(wasmtime_wasi_http::Error::HttpRequestDenied) };
            let (response, driver) = send(&egress, request, options.unwrap_or_default()).await?;
            let driver: Box<dyn Future<Output = _> + Send> =
                Box::new(crate::cpu::Metered::new(meter, Box::into_pin(driver)));
            Ok((response, driver))
        }))
    }
}

async fn send(
    egress: &Egress,
    mut request: http::Request<wasmtime_wasi_http::WasiBody>,
    options: wasmtime_wasi_http::RequestOptions,
) -> SendResult {
    use wasmtime_wasi_http::Error as E;
    let uri = request.uri().clone();
    let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri.host().ok_or(E::HttpRequestUriInvalid)?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let connect_timeout = options.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
    let stream = egress.connect(&host, port, connect_timeout).await.map_err(|e| {
        tracing::debug!(%uri, error = %e, "outgoing wasi:http request");
        connect_error(e)
    })?;
    let _ = stream.set_nodelay(true);
    let io: Box<dyn Stream> = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| E::HttpRequestUriInvalid)?;
        let tls = tokio::time::timeout(connect_timeout, tls_connector().connect(name, stream))
            .await
            .map_err(|_| E::ConnectionTimeout)?
            .map_err(|e| {
                tracing::debug!(%uri, error = %e, "outgoing wasi:http TLS handshake");
                tls_error(e)
            })?;
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (mut sender, conn) =
        tokio::time::timeout(connect_timeout, hyper::client::conn::http1::handshake(TokioIo::new(io)))
            .await
            .map_err(|_| E::ConnectionTimeout)??;
    // On the wire, the request line has the path only (the Host header has the authority).
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(uri.path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .map_err(|_| E::HttpRequestUriInvalid)?;
    let first_byte = options.first_byte_timeout.unwrap_or(READ_TIMEOUT);
    let between = options.between_bytes_timeout.unwrap_or(READ_TIMEOUT).max(Duration::from_nanos(1));
    // The connection is driven while the response head is awaited, then handed back to be
    // driven on its own while the guest reads the body.
    let mut conn = Box::pin(conn);
    let mut conn_ended = false;
    let response = {
        let sent = tokio::time::timeout(first_byte, sender.send_request(request));
        tokio::pin!(sent);
        tokio::select! {
            r = &mut sent => r.map_err(|_| E::ConnectionReadTimeout)??,
            ended = &mut conn => {
                conn_ended = true;
                ended?;
                sent.await.map_err(|_| E::ConnectionReadTimeout)??
            }
        }
    };
    let response = response.map(|incoming| {
        use http_body_util::BodyExt;
        TimedBody { incoming, between, deadline: Box::pin(tokio::time::sleep(between)) }.boxed_unsync()
    });
    let driver = async move {
        if conn_ended {
            return Ok(());
        }
        match conn.await {
            Err(e) if e.is_timeout() => Err(E::HttpResponseTimeout),
            other => other.map_err(E::from),
        }
    };
    Ok((response, Box::new(driver)))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A response body whose frames must come within `between` of each other.
struct TimedBody {
    incoming: hyper::body::Incoming,
    between: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.between;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.incoming)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.incoming)
    }
}

/// The guest's error code for a connection not made.
fn connect_error(e: ConnectError) -> wasmtime_wasi_http::Error {
    use std::io::ErrorKind as K;
    use wasmtime_wasi_http::Error as E;
    match e {
        ConnectError::Lookup(_, LookupError::InvalidName) => E::HttpRequestUriInvalid,
        ConnectError::Lookup(_, LookupError::NotFound) => {
            E::DnsError { rcode: Some("NXDOMAIN".to_string()), info_code: None }
        }
        ConnectError::Lookup(_, LookupError::NoAnswer) => E::DnsTimeout,
        // kube-proxy rejects a Service with no endpoints: the client sees a refusal.
        ConnectError::NoEndpoints(_) => E::ConnectionRefused,
        ConnectError::Timeout(_) => E::ConnectionTimeout,
        ConnectError::Io(_, e) => match e.kind() {
            K::ConnectionRefused => E::ConnectionRefused,
            K::ConnectionReset | K::ConnectionAborted => E::ConnectionTerminated,
            K::TimedOut => E::ConnectionTimeout,
            K::NetworkUnreachable | K::HostUnreachable => E::DestinationUnavailable,
            K::AddrNotAvailable => E::DestinationIpUnroutable,
            _ => E::InternalError(Some(e.to_string())),
        },
    }
}

/// The guest's error code for a failed TLS handshake.
fn tls_error(e: std::io::Error) -> wasmtime_wasi_http::Error {
    use wasmtime_wasi_http::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) | Some(rustls::Error::NoCertificatesPresented) => {
            E::TlsCertificateError
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            E::TlsAlertReceived { alert_id: Some(u8::from(*alert)), alert_message: Some(format!("{alert:?}")) }
        }
        Some(_) => E::TlsProtocolError,
        None => connect_error(ConnectError::Io(SocketAddr::from(([0, 0, 0, 0], 0)), e)),
    }
}

/// TLS for outgoing requests: the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are
/// honoured, as OpenSSL does), loaded once.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "loading the system's CA certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::info!(added, ignored, "CA certificates for outgoing wasi:http requests");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("rustls protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU of an outgoing request is the guest's: the send and the connection's driver
    /// are metered on the guest's meter, the body's transfer included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outgoing_requests_are_charged_to_the_guest() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Small: the node's core tokens are the process's, and other tests of this binary
        // measure CPU shares while this one runs.
        const BODY: usize = 1 << 20;
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head).await.unwrap();
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
            conn.write_all(reply.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..BODY / chunk.len() {
                conn.write_all(&chunk).await.unwrap();
            }
        });
        let handle = tokio::runtime::Handle::current();
        let egress = Egress {
            dns: Arc::new(crate::net::dns::PodDns::parse("", "", handle.clone())),
            pod: None,
            host: handle,
            services: crate::net::services::ServiceTable::new(),
            client: "10.88.0.2".parse().unwrap(),
        };
        let meter = Arc::new(crate::engine::GuestMeter::default());
        let mut hooks = Hooks { egress: Some(Arc::new(egress)), meter: meter.clone() };
        let body = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
        let request = http::Request::get(format!("http://{addr}/big")).body(body).unwrap();
        let sent =
            wasmtime_wasi_http::WasiHttpHooks::send_request(&mut hooks, request, None, Box::new(async { Ok(()) }));
        let (response, driver) = Box::into_pin(sent).await.unwrap();
        let cpu = || meter.cpu_nanos.load(std::sync::atomic::Ordering::Relaxed);
        let at_head = cpu();
        assert!(at_head > 0, "the send is charged");
        let driving = tokio::spawn(Box::into_pin(driver));
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), BODY);
        driving.await.unwrap().unwrap();
        assert!(cpu() > at_head, "the connection's driver is charged too: {at_head} then {}", cpu());
    }

    #[test]
    fn only_components_importing_a_filesystem_get_preopens() {
        let engine = wasmtime::Engine::default();
        let component = |wat: &str| wasmtime::component::Component::new(&engine, wat).unwrap();
        let proxy = component(
            r#"(component (import "wasi:cli/stdout@0.2.12" (instance)) (import "wasi:http/types@0.2.12" (instance)))"#,
        );
        assert!(!imports_filesystem(&engine, &proxy));
        let files = component(
            r#"(component (import "wasi:http/types@0.2.12" (instance)) (import "wasi:filesystem/preopens@0.2.12" (instance)))"#,
        );
        assert!(imports_filesystem(&engine, &files));
    }
}
