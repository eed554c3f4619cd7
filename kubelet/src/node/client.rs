//! The node's API client, and the rotation of its client certificate.
//!
//! With the certificate TLS bootstrapping wrote (`<root>/pki/kubelet-client-current.pem`), the
//! client presents it through a resolver that rotation swaps, as the kubelet's certificate
//! manager does: at 70-90% of the certificate's lifetime (jittered) a new key and CSR are
//! sent with the current credentials, the signed certificate replaces the file and the one
//! in use, and every connection made with the old one is closed (client-go's connrotation),
//! because the API server checks the certificate on each request and the old one expires.
//! Other kubeconfigs (tokens, certificates of their own) get kube's usual client.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use kube::client::ConfigExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::config::NodeConfig;
use super::throttle::ThrottleLayer;
use super::{Error, bootstrap};

/// The node's client, and its rotating certificate when it has one.
pub struct NodeClient {
    pub client: kube::Client,
    pub certificate: Option<Arc<ClientCertificate>>,
}

/// The kubeconfig at `path` (`what` names it in errors: "kubeconfig", "bootstrap
/// kubeconfig"), and the client configuration of its current context.
pub async fn load(path: &Path, what: &str) -> Result<(kube::config::Kubeconfig, kube::Config), Error> {
    let fail = |e: &dyn std::fmt::Display| Error::Config(format!("{what} {}: {e}", path.display()));
    let file =
        kube::config::Kubeconfig::read_from(path).map_err(|e| fail(&format!("cannot be read as a kubeconfig: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(file.clone(), &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| fail(&e))?;
    Ok((file, config))
}

fn bad(path: &Path) -> impl Fn(kube::Error) -> Error + '_ {
    move |e| Error::Config(format!("kubeconfig {}: {e}", path.display()))
}

/// A client for the API server of the kubeconfig at `path`, its requests within kubeAPIQPS
/// and kubeAPIBurst. When its credentials are the certificate at `managed` (TLS
/// bootstrapping's), the client presents whatever certificate rotation last put there.
pub async fn connect(path: &Path, cfg: &NodeConfig, managed: &Path) -> Result<NodeClient, Error> {
    let (_, config) = load(path, "kubeconfig").await?;
    let throttle = ThrottleLayer::new(cfg.kube_api_qps, cfg.kube_api_burst);
    let auth = &config.auth_info;
    let ours = |p: &Option<String>| p.as_deref().map(Path::new) == Some(managed);
    if !(ours(&auth.client_certificate) && ours(&auth.client_key)) {
        let builder = kube::client::ClientBuilder::try_from(config).map_err(bad(path))?;
        return Ok(NodeClient { client: builder.with_layer(&throttle).build(), certificate: None });
    }
    let certificate = Arc::new(ClientCertificate::load(managed)?);
    let mut tls = config.rustls_client_config().map_err(bad(path))?;
    tls.client_auth_cert_resolver = certificate.clone();
    // A resumed TLS session keeps the client certificate it was made with: none, so that a
    // new connection presents the certificate in use.
    tls.resumption = rustls::client::Resumption::disabled();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // kube's connect timeout; keepalive finds a peer that vanished under an idle watch.
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(Duration::from_secs(30)));
    let connector = GuardedConnector { http, conns: certificate.conns.clone() };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let service = tower::ServiceBuilder::new()
        .layer(throttle)
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(bad(path))?)
        .layer(config.extra_headers_layer().map_err(bad(path))?)
        // One error type whether or not the kubeconfig adds an auth layer.
        .map_err(|e: hyper_util::client::legacy::Error| -> tower::BoxError { Box::new(e) })
        .service(hyper);
    let client = kube::Client::new(service, config.default_namespace.clone());
    Ok(NodeClient { client, certificate: Some(certificate) })
}

/// A certificate and key in use, and its validity.
pub(crate) struct Current {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// The node's client certificate: presented to the API server from here, replaced by rotation.
pub struct ClientCertificate {
    pem: PathBuf,
    current: RwLock<Current>,
    conns: Arc<Connections>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate").field("pem", &self.pem).finish()
    }
}

/// A PEM certificate chain and key.
pub(crate) fn parse(what: &Path, text: &[u8]) -> Result<Current, Error> {
    let bad = |why: String| Error::Config(format!("certificate {}: {why}", what.display()));
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(text).collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    let first = chain.first().ok_or_else(|| bad("no certificate in it".into()))?;
    let key = PrivateKeyDer::from_pem_slice(text).map_err(|e| bad(format!("key: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first).map_err(|e| bad(e.to_string()))?;
    let at =
        |t: &x509_parser::time::ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let (not_before, not_after) = (at(&cert.validity().not_before), at(&cert.validity().not_after));
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| bad(e.to_string()))?;
    Ok(Current { key: Arc::new(key), not_before, not_after })
}

impl ClientCertificate {
    pub fn load(pem: &Path) -> Result<ClientCertificate, Error> {
        let text = std::fs::read(pem).map_err(|e| Error::Config(format!("read {}: {e}", pem.display())))?;
        let current = parse(pem, &text)?;
        Ok(ClientCertificate { pem: pem.to_path_buf(), current: RwLock::new(current), conns: Arc::default() })
    }

    /// When the certificate in use starts and stops being valid.
    pub fn validity(&self) -> (SystemTime, SystemTime) {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        (c.not_before, c.not_after)
    }

    /// Puts a newly issued certificate and key (PEM) in place: on disk first (a restart
    /// finds it), then in use; connections made with the old one are closed.
    pub fn replace(&self, text: &str) -> Result<(), Error> {
        let next = parse(&self.pem, text.as_bytes())?;
        bootstrap::write_private(&self.pem, text)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        self.conns.close_all();
        Ok(())
    }
}

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// When to rotate a certificate valid from `not_before` to `not_after`: at 70% of its
/// lifetime plus up to 20% more by `jitter` (0..1), as the kubelet's certificate manager.
pub fn rotation_deadline(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let total = not_after.duration_since(not_before).unwrap_or_default();
    not_before + total.mul_f64(0.7 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// How long a rotation waits for its request to be approved and signed before it asks
/// again (the kubelet's certificate wait timeout).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Rotates `certificate` before it expires, for as long as the node runs; `client` presents
/// it (the request is made with the node's own credentials).
pub async fn rotate(certificate: Arc<ClientCertificate>, client: kube::Client, node_name: String) {
    let purpose = bootstrap::Purpose::Client;
    keep_fresh(
        "client certificate",
        || Some(certificate.validity()),
        || async { certificate.replace(&bootstrap::issue(&client, &node_name, &purpose).await?) },
    )
    .await
}

/// Keeps a certificate fresh for as long as the node runs: waits for its rotation deadline
/// (at once when there is none yet), then `renew`s it (which asks for one and puts it in
/// place), backing off after a failure.
pub(crate) async fn keep_fresh<F, Fut>(what: &str, validity: impl Fn() -> Option<(SystemTime, SystemTime)>, renew: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let mut failures = 0u32;
    loop {
        let had = validity().is_some();
        if let Some((not_before, not_after)) = validity() {
            let deadline = rotation_deadline(not_before, not_after, rand::random::<f64>());
            let at =
                |t: SystemTime| k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default();
            tracing::info!(expires = %at(not_after), rotation = %at(deadline), "{what}");
            // Slept in steps, so that a clock that jumps is noticed.
            while let Ok(left) = deadline.duration_since(SystemTime::now()) {
                tokio::time::sleep(left.min(Duration::from_secs(600))).await;
            }
        }
        let result = match tokio::time::timeout(ISSUE_TIMEOUT, renew()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Config(format!("no certificate issued within {ISSUE_TIMEOUT:?}"))),
        };
        match result {
            Ok(()) => {
                failures = 0;
                tracing::info!("{what} {}", if had { "rotated" } else { "issued" });
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_secs(5 << failures.min(6));
                tracing::error!(error = %e, retry_in = ?wait, "{what}: no new one");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The connections a client made, so that they can be closed at once.
#[derive(Default)]
struct Connections {
    generation: AtomicU64,
    next_id: AtomicU64,
    /// Each open connection's reader waiting for data, woken to see it is closed.
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Connections {
    fn close_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let wakers: Vec<Waker> =
            self.wakers.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.wake();
        }
    }
}

/// A connection that fails once [`Connections::close_all`] was called after it was made.
struct Guarded<T> {
    inner: T,
    conns: Arc<Connections>,
    generation: u64,
    id: u64,
}

impl<T> Guarded<T> {
    fn closed(&self) -> bool {
        self.conns.generation.load(Ordering::SeqCst) != self.generation
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed: the client certificate was rotated")
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.conns.wakers.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.closed() {
            return Poll::Ready(Err(aborted()));
        }
        let polled = Pin::new(&mut me.inner).poll_read(cx, buf);
        if polled.is_pending() {
            let mut wakers = me.conns.wakers.lock().unwrap_or_else(|e| e.into_inner());
            match wakers.get_mut(&me.id) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => w.clone_from(cx.waker()),
                None => {
                    wakers.insert(me.id, cx.waker().clone());
                }
            }
            drop(wakers);
            // Closed between the check and the registration: not woken, so answer now.
            if me.closed() {
                return Poll::Ready(Err(aborted()));
            }
        }
        polled
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for Guarded<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

/// The HTTP connector, its connections guarded.
#[derive(Clone)]
struct GuardedConnector {
    http: HttpConnector,
    conns: Arc<Connections>,
}

type TcpIo = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

impl tower::Service<http::Uri> for GuardedConnector {
    type Response = Guarded<TcpIo>;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = BoxFuture<'static, Result<Guarded<TcpIo>, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.http, cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = tower::Service::call(&mut self.http, uri);
        let conns = self.conns.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let generation = conns.generation.load(Ordering::SeqCst);
            let id = conns.next_id.fetch_add(1, Ordering::SeqCst);
            Ok(Guarded { inner: io, conns, generation, id })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_at_70_to_90_percent_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let end = t0 + Duration::from_secs(1000);
        assert_eq!(rotation_deadline(t0, end, 0.0), t0 + Duration::from_secs(700));
        assert_eq!(rotation_deadline(t0, end, 1.0), t0 + Duration::from_secs(900));
        assert_eq!(rotation_deadline(t0, end, 0.5), t0 + Duration::from_secs(800));
        assert_eq!(rotation_deadline(t0, end, 7.0), t0 + Duration::from_secs(900), "jitter is clamped");
        assert_eq!(rotation_deadline(end, t0, 0.5), end, "a certificate that ends before it starts: now");
    }

    /// A self-signed certificate and key valid for `days` (at most 30) from 2026-01-01.
    fn pem(name: &str, days: u8) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 1, 1 + days);
        let cert = params.self_signed(&key).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_replaced_certificate_is_written_presented_and_closes_old_connections() {
        use rustls::client::ResolvesClientCert;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pki").join("kubelet-client-current.pem");
        bootstrap::write_private(&path, &pem("one", 10)).unwrap();
        let c = ClientCertificate::load(&path).unwrap();
        let (from, to) = c.validity();
        assert_eq!(to.duration_since(from).unwrap(), Duration::from_secs(10 * 86400));
        let first = c.resolve(&[], &[]).unwrap().cert[0].clone();
        let generation = c.conns.generation.load(Ordering::SeqCst);
        // A bad replacement changes nothing.
        assert!(c.replace("not a certificate").is_err());
        assert_eq!(c.resolve(&[], &[]).unwrap().cert[0], first);
        let next = pem("two", 20);
        c.replace(&next).unwrap();
        assert_ne!(c.resolve(&[], &[]).unwrap().cert[0], first, "the new certificate is presented");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), next, "and stored");
        assert_eq!(c.validity().1.duration_since(c.validity().0).unwrap(), Duration::from_secs(20 * 86400));
        assert_eq!(c.conns.generation.load(Ordering::SeqCst), generation + 1, "old connections closed");
        let err = ClientCertificate::load(&dir.path().join("missing.pem")).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }

    #[tokio::test]
    async fn closing_all_connections_ends_a_waiting_reader() {
        use hyper::rt::Read;
        let conns = Arc::new(Connections::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let mut connector = GuardedConnector { http: HttpConnector::new(), conns: conns.clone() };
        let uri: http::Uri = format!("http://{addr}").parse().unwrap();
        let mut conn = tower::Service::call(&mut connector, uri).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut read = hyper::rt::ReadBuf::new(&mut buf);
            std::future::poll_fn(|cx| Pin::new(&mut conn).poll_read(cx, read.unfilled())).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "nothing to read yet");
        conns.close_all();
        let r = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("woken").unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
