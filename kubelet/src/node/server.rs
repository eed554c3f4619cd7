//! The node's HTTPS API (the kubelet's port 10250), which the API server's proxy reaches for
//! `kubectl logs`, `exec`, `attach` and `port-forward`.
//!
//! As the kubelet's server: every request is authenticated (a client certificate signed by the
//! client CA, else a bearer token checked with a TokenReview; anonymous requests are refused)
//! and authorized with a SubjectAccessReview on the node's subresource its path maps to
//! (`/stats` stats, `/metrics` metrics, `/logs` log, the rest proxy). Streaming requests are
//! handed to the runtime's streaming server: the node asks the CRI for a URL and proxies the
//! upgraded connection to it, bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cri_proto::v1 as cri;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::{TcpListener, TcpStream};

use super::Error;
use crate::cri::{CONTAINER_NAME, Cri, POD_NAME, POD_NAMESPACE};
use crate::logs::LogOptions;

type Body = BoxBody<Bytes, std::io::Error>;

/// What the node API serves from.
pub struct NodeServer {
    pub client: kube::Client,
    pub cri: Cri,
    pub node_name: String,
    /// When the node started (the summary's node startTime).
    pub started: SystemTime,
    /// The node's settings (`/configz`).
    pub config: super::NodeConfig,
    /// What the eviction manager last found on disk (the summary's filesystem figures).
    pub storage: tokio::sync::watch::Receiver<std::sync::Arc<crate::eviction::Storage>>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// A self-signed serving certificate and key (PEM) for the node's name and address, as the
/// kubelet makes when it is given none.
pub fn self_signed(node_name: &str, ip: &str) -> Result<(String, String), Error> {
    let bad = |e: rcgen::Error| Error::Config(format!("make the serving certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let mut names = vec![node_name.to_string()];
    if !ip.is_empty() {
        names.push(ip.to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(bad)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("{node_name}@wasmlet"));
    let cert = params.self_signed(&key).map_err(bad)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Where the serving certificate comes from.
pub enum Serving {
    /// A certificate and key (PEM): tlsCertFile and tlsPrivateKeyFile, or self-signed.
    Fixed(Vec<u8>, Vec<u8>),
    /// Issued by the cluster, and replaced as it rotates (serverTLSBootstrap).
    Issued(Arc<super::serving::ServingCertificate>),
}

/// The TLS settings: the serving certificate, and the CAs client certificates must chain to
/// (a client without a certificate may still present a bearer token).
pub fn tls_config(serving: Serving, client_cas: &[Vec<u8>]) -> Result<rustls::ServerConfig, Error> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("node API TLS: {what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in client_cas {
        roots.add(CertificateDer::from(der.clone())).map_err(|e| bad("client CA", &e))?;
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocols", &e))?;
    let builder = if roots.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("client verifier", &e))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut cfg = match serving {
        Serving::Fixed(cert_pem, key_pem) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| bad("certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("key", &e))?;
            builder.with_single_cert(chain, key).map_err(|e| bad("certificate and key", &e))?
        }
        Serving::Issued(c) => builder.with_cert_resolver(c),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves the node API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: rustls::ServerConfig, server: Arc<NodeServer>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "node API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "node API TLS handshake failed"),
                Err(_) => return tracing::debug!(peer = %peer, "node API TLS handshake timed out"),
            };
            let cert_user = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| cert_user(c));
            let svc = hyper::service::service_fn(move |req| {
                let (server, cert_user) = (server.clone(), cert_user.clone());
                async move { Ok::<_, std::convert::Infallible>(server.handle(cert_user, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(peer = %peer, error = %e, "node API connection ended");
            }
        });
    }
}

/// The user a verified client certificate names: its CN, its O's as groups.
fn cert_user(der: &CertificateDer<'_>) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some(User { name, groups })
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

fn json(v: &serde_json::Value) -> Response<Body> {
    let mut r = full(StatusCode::OK, v.to_string());
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("a valid header"));
    r
}

/// A 200 in the Prometheus text format.
fn prometheus(body: String) -> Response<Body> {
    let mut r = full(StatusCode::OK, body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8".parse().expect("a valid header"));
    r
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = full(status, format!("{msg}\n"));
    r.headers_mut().insert(header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("a valid header"));
    r
}

/// The node subresource a path is authorized as, and the verb of a method (the kubelet's
/// `GetRequestAttributes`).
pub fn attributes(method: &Method, path: &str) -> (&'static str, &'static str) {
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    let subresource = if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else {
        "proxy"
    };
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    (verb, subresource)
}

/// Decoded `k=v` pairs of a query string.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn flag(pairs: &[(String, String)], names: &[&str]) -> bool {
    pairs.iter().any(|(k, v)| names.contains(&k.as_str()) && (v == "1" || v == "true"))
}

/// The streams an exec or attach query asks for (the API server's names first); with a tty
/// there is no stderr.
struct Streams {
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

impl Streams {
    fn of(pairs: &[(String, String)]) -> Streams {
        let tty = flag(pairs, &["tty"]);
        Streams {
            tty,
            stdin: flag(pairs, &["input", "stdin"]),
            stdout: flag(pairs, &["output", "stdout"]),
            stderr: flag(pairs, &["error", "stderr"]) && !tty,
        }
    }
}

impl NodeServer {
    async fn handle(&self, cert_user: Option<User>, req: Request<Incoming>) -> Response<Body> {
        let user = match cert_user {
            Some(u) => u,
            None => match self.token_user(req.headers()).await {
                Ok(Some(u)) => u,
                Ok(None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
                Err(e) => {
                    tracing::warn!(error = %e, "node API: TokenReview failed");
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized");
                }
            },
        };
        let path = req.uri().path().to_string();
        let (verb, subresource) = attributes(req.method(), &path);
        match self.authorized(&user, verb, subresource).await {
            Ok(true) => {}
            Ok(false) => {
                let msg = format!(
                    "Forbidden (user={}, verb={verb}, resource=nodes, subresource(s)=[{subresource}])",
                    user.name
                );
                return text(StatusCode::FORBIDDEN, &msg);
            }
            Err(e) => {
                tracing::warn!(error = %e, "node API: SubjectAccessReview failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "Authorization error");
            }
        }
        tracing::debug!(user = %user.name, path = %path, "node API request");
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let pairs = query_pairs(req.uri().query().unwrap_or(""));
        let result = match parts.as_slice() {
            ["healthz"] => Ok(text(StatusCode::OK, "ok")),
            ["stats", "summary"] => self.stats_summary().await,
            ["configz"] => Ok(json(&serde_json::json!({"kubeletconfig": self.config}))),
            ["pods"] => self.pods().await,
            ["runningpods"] => self.running_pods().await,
            ["metrics", "resource"] => self.metrics_resource().await,
            ["metrics"] => self.metrics().await,
            ["metrics", "probes"] => Ok(prometheus(crate::metrics::render(crate::metrics::PROBER, &[]))),
            ["containerLogs", ns, pod, container] => self.logs(ns, pod, container, &pairs).await,
            [verb @ ("exec" | "attach"), ns, pod, container] | [verb @ ("exec" | "attach"), ns, pod, _, container] => {
                let (verb, ns, pod, container) =
                    (verb.to_string(), ns.to_string(), pod.to_string(), container.to_string());
                self.remote_command(&verb, (&ns, &pod, &container), &pairs, req).await
            }
            ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
                let (ns, pod) = (ns.to_string(), pod.to_string());
                self.port_forward(&ns, &pod, &pairs, req).await
            }
            _ => Ok(text(StatusCode::NOT_FOUND, "404 page not found")),
        };
        result.unwrap_or_else(|(status, msg)| text(status, &msg))
    }

    /// The pods bound to this node, as a PodList.
    async fn pods(&self) -> Result<Response<Body>, (StatusCode, String)> {
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::all(self.client.clone());
        let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={}", self.node_name));
        let list = api.list(&lp).await.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let items = serde_json::to_value(&list.items).unwrap_or_default();
        Ok(json(&serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})))
    }

    /// The pods the runtime runs, as the kubelet's /runningpods lists them: names, uids and
    /// their running containers.
    async fn running_pods(&self) -> Result<Response<Body>, (StatusCode, String)> {
        let (sandboxes, containers) = self.cri_lists().await?;
        let items: Vec<serde_json::Value> = sandboxes
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .map(|s| {
                let m = s.metadata.clone().unwrap_or_default();
                let cs: Vec<serde_json::Value> = containers
                    .iter()
                    .filter(|c| c.pod_sandbox_id == s.id && c.state == cri::ContainerState::ContainerRunning as i32)
                    .map(|c| {
                        serde_json::json!({
                            "name": c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                            "image": c.image.as_ref().map(|i| i.image.clone()).unwrap_or_default(),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "metadata": {"name": m.name, "namespace": m.namespace, "uid": m.uid},
                    "spec": {"containers": cs},
                    "status": {},
                })
            })
            .collect();
        Ok(json(&serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})))
    }

    /// Every sandbox and container the runtime has.
    async fn cri_lists(&self) -> Result<(Vec<cri::PodSandbox>, Vec<cri::Container>), (StatusCode, String)> {
        let mut rt = self.cri.rt.clone();
        let sandboxes = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.map_err(grpc)?;
        let containers = rt.list_containers(cri::ListContainersRequest { filter: None }).await.map_err(grpc)?;
        Ok((sandboxes.into_inner().items, containers.into_inner().containers))
    }

    /// The ready pods' figures, from the CRI.
    async fn pod_stats(&self) -> Result<Vec<super::stats::PodStat>, (StatusCode, String)> {
        let (sandboxes, containers) = self.cri_lists().await?;
        let mut rt = self.cri.rt.clone();
        let stats = rt
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .map_err(grpc)?
            .into_inner()
            .stats;
        Ok(super::stats::pods(&sandboxes, &containers, &stats))
    }

    async fn stats_summary(&self) -> Result<Response<Body>, (StatusCode, String)> {
        let pods = self.pod_stats().await?;
        let nanos = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let node = super::stats::node_usage();
        let images = self.cri.img.clone().image_fs_info(cri::ImageFsInfoRequest {}).await.map_err(grpc)?.into_inner();
        let images_bytes = images.image_filesystems.first().and_then(|f| f.used_bytes.as_ref()).map(|v| v.value);
        let storage = self.storage.borrow().clone();
        let body = super::stats::summary(
            &self.node_name,
            nanos(self.started),
            nanos(SystemTime::now()),
            &node,
            &pods,
            &storage,
            images_bytes,
        );
        let mut r = full(StatusCode::OK, body.to_string());
        r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("a valid header"));
        Ok(r)
    }

    async fn metrics_resource(&self) -> Result<Response<Body>, (StatusCode, String)> {
        let pods = self.pod_stats().await?;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        Ok(prometheus(super::stats::resource_metrics(now, &super::stats::node_usage(), &pods)))
    }

    /// The kubelet's own metrics: what was recorded, and what runs now (from the CRI).
    async fn metrics(&self) -> Result<Response<Body>, (StatusCode, String)> {
        use crate::metrics::{NODE_NAME, RUNNING_CONTAINERS, RUNNING_PODS, Sample};
        let (sandboxes, containers) = self.cri_lists().await?;
        let ready = sandboxes.iter().filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32).count();
        let states = [
            (cri::ContainerState::ContainerCreated, "created"),
            (cri::ContainerState::ContainerRunning, "running"),
            (cri::ContainerState::ContainerExited, "exited"),
            (cri::ContainerState::ContainerUnknown, "unknown"),
        ];
        let by_state = states
            .iter()
            .map(|(state, name)| Sample {
                labels: vec![("container_state", name.to_string())],
                value: containers.iter().filter(|c| c.state == *state as i32).count() as f64,
            })
            .collect();
        let gauges = [
            (&NODE_NAME, vec![Sample { labels: vec![("node", self.node_name.clone())], value: 1.0 }]),
            (&RUNNING_PODS, vec![Sample { labels: vec![], value: ready as f64 }]),
            (&RUNNING_CONTAINERS, by_state),
        ];
        Ok(prometheus(crate::metrics::render(crate::metrics::KUBELET, &gauges)))
    }

    async fn token_user(&self, headers: &HeaderMap) -> Result<Option<User>, kube::Error> {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let review = TokenReview { spec: TokenReviewSpec { token, ..Default::default() }, ..Default::default() };
        let done = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        let u = status.user.unwrap_or_default();
        Ok(u.username.map(|name| User { name, groups: u.groups.unwrap_or_default() }))
    }

    async fn authorized(&self, user: &User, verb: &str, subresource: &str) -> Result<bool, kube::Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_string()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.to_string()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let done = Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        Ok(done.status.is_some_and(|s| s.allowed))
    }

    /// The pod's containers named `container`, newest attempt first.
    async fn containers(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Result<Vec<cri::Container>, (StatusCode, String)> {
        let mut rt = self.cri.rt.clone();
        let filter = cri::ContainerFilter {
            label_selector: [
                (POD_NAMESPACE.to_string(), ns.to_string()),
                (POD_NAME.to_string(), pod.to_string()),
                (CONTAINER_NAME.to_string(), container.to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let mut list = rt
            .list_containers(cri::ListContainersRequest { filter: Some(filter) })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()))?
            .into_inner()
            .containers;
        list.sort_by_key(|c| std::cmp::Reverse((c.metadata.as_ref().map_or(0, |m| m.attempt), c.created_at)));
        if list.is_empty() {
            return Err((StatusCode::NOT_FOUND, format!("container {container:?} in pod {ns}/{pod} not found")));
        }
        Ok(list)
    }

    async fn running(&self, ns: &str, pod: &str, container: &str) -> Result<String, (StatusCode, String)> {
        let list = self.containers(ns, pod, container).await?;
        list.into_iter()
            .find(|c| c.state == cri::ContainerState::ContainerRunning as i32)
            .map(|c| c.id)
            .ok_or((StatusCode::BAD_REQUEST, format!("container {container:?} in pod {ns}/{pod} is not running")))
    }

    async fn logs(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        pairs: &[(String, String)],
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let o = LogOptions::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), SystemTime::now())
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let list = self.containers(ns, pod, container).await?;
        let chosen = if o.previous {
            list.get(1).ok_or((
                StatusCode::BAD_REQUEST,
                format!("previous terminated container {container:?} in pod {pod:?} not found"),
            ))?
        } else {
            &list[0]
        };
        let mut rt = self.cri.rt.clone();
        let status = rt
            .container_status(cri::ContainerStatusRequest { container_id: chosen.id.clone(), verbose: false })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()))?
            .into_inner()
            .status
            .unwrap_or_default();
        let path = std::path::PathBuf::from(&status.log_path);
        let running = status.state == cri::ContainerState::ContainerRunning as i32;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let follow = o.follow && running && !o.previous;
        let id = chosen.id.clone();
        let cri = self.cri.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_log(&path, &o, follow, &id, cri, tx).await {
                tracing::debug!(error = %e, "log stream ended");
            }
        });
        let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        }));
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(header::CONTENT_TYPE, "text/plain".parse().expect("a valid header"));
        Ok(r)
    }

    /// Exec and attach: the CRI gives a URL on the runtime's streaming server, to which the
    /// upgraded connection is proxied.
    async fn remote_command(
        &self,
        verb: &str,
        (ns, pod, container): (&str, &str, &str),
        pairs: &[(String, String)],
        req: Request<Incoming>,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let container_id = self.running(ns, pod, container).await?;
        let s = Streams::of(pairs);
        let mut rt = self.cri.rt.clone();
        let url = if verb == "exec" {
            let cmd = pairs.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
            let (tty, stdin, stdout, stderr) = (s.tty, s.stdin, s.stdout, s.stderr);
            let exec = cri::ExecRequest { container_id, cmd, tty, stdin, stdout, stderr, ..Default::default() };
            rt.exec(exec).await.map_err(grpc)?.into_inner().url
        } else {
            let (tty, stdin, stdout, stderr) = (s.tty, s.stdin, s.stdout, s.stderr);
            let attach = cri::AttachRequest { container_id, tty, stdin, stdout, stderr, ..Default::default() };
            rt.attach(attach).await.map_err(grpc)?.into_inner().url
        };
        proxy(req, &url).await
    }

    async fn port_forward(
        &self,
        ns: &str,
        pod: &str,
        pairs: &[(String, String)],
        req: Request<Incoming>,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let mut rt = self.cri.rt.clone();
        let filter = cri::PodSandboxFilter {
            label_selector: [(POD_NAMESPACE.to_string(), ns.to_string()), (POD_NAME.to_string(), pod.to_string())]
                .into(),
            state: Some(cri::PodSandboxStateValue { state: cri::PodSandboxState::SandboxReady as i32 }),
            ..Default::default()
        };
        let sandboxes = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) })
            .await
            .map_err(grpc)?
            .into_inner()
            .items;
        let sandbox = sandboxes.first().ok_or((StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found")))?;
        let port = pairs.iter().filter(|(k, _)| k == "port").filter_map(|(_, v)| v.parse().ok()).collect();
        let url = rt
            .port_forward(cri::PortForwardRequest { pod_sandbox_id: sandbox.id.clone(), port })
            .await
            .map_err(grpc)?
            .into_inner()
            .url;
        let url = match req.uri().query() {
            Some(q) if !q.is_empty() => format!("{url}?{q}"),
            _ => url,
        };
        proxy(req, &url).await
    }
}

fn grpc(e: tonic::Status) -> (StatusCode, String) {
    let code = match e.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, e.message().to_string())
}

/// Headers of an upgrade that the runtime's streaming server needs to see.
const UPGRADE_HEADERS: &[&str] = &[
    "connection",
    "upgrade",
    "x-stream-protocol-version",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// Proxies an upgrade request to the runtime's streaming URL and, once both sides have
/// switched protocols, copies bytes both ways (the kubelet's proxy to a CRI streaming server).
async fn proxy(req: Request<Incoming>, url: &str) -> Result<Response<Body>, (StatusCode, String)> {
    let fail = |e: &dyn std::fmt::Display| (StatusCode::INTERNAL_SERVER_ERROR, format!("streaming proxy: {e}"));
    let rest = url.strip_prefix("http://").ok_or_else(|| fail(&format!("unexpected streaming URL {url}")))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let addr: SocketAddr = host.parse().map_err(|e| fail(&e))?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| fail(&e))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| fail(&e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut out = Request::builder().method(req.method().clone()).uri(path).header(header::HOST, host);
    for name in UPGRADE_HEADERS {
        for v in req.headers().get_all(*name) {
            out = out.header(*name, v.clone());
        }
    }
    let out = out.body(Full::new(Bytes::new())).map_err(|e| fail(&e))?;
    let mut resp = sender.send_request(out).await.map_err(|e| fail(&e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Ok(full(status, body));
    }
    let mut back = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *back.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *back.headers_mut() = resp.headers().clone();
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (client, runtime) = match tokio::join!(hyper::upgrade::on(req), upstream) {
            (Ok(c), Ok(r)) => (c, r),
            _ => return tracing::debug!("streaming proxy: an upgrade failed"),
        };
        let (mut client, mut runtime) = (TokioIo::new(client), TokioIo::new(runtime));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut runtime).await;
    });
    Ok(back)
}

/// Writes what `o` selects of the log at `path` to `tx`; with `follow`, goes on as the file
/// grows and across its rotation (the kubelet renames it and the runtime reopens the path)
/// until the container ends or the client leaves.
async fn stream_log(
    path: &std::path::Path,
    o: &LogOptions,
    follow: bool,
    id: &str,
    cri: Cri,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut content = Vec::new();
    file.read_to_end(&mut content).await?;
    let mut selector = crate::logs::Selector::new(o);
    let out = selector.feed(&content);
    if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
        return Ok(());
    }
    if !follow || selector.full() {
        return Ok(());
    }
    let mut offset = content.len() as u64;
    let mut ino = file.metadata().await?.ino();
    let mut rt = cri.rt.clone();
    let mut checks = 0u32;
    loop {
        let mut chunk = Vec::new();
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        file.read_to_end(&mut chunk).await?;
        offset += chunk.len() as u64;
        let rotated = match tokio::fs::metadata(path).await {
            Ok(m) => m.ino() != ino,
            Err(_) => false,
        };
        let ended = if chunk.is_empty() {
            checks += 1;
            // Every second or so, whether the container still runs.
            checks.is_multiple_of(4)
                && rt
                    .container_status(cri::ContainerStatusRequest { container_id: id.to_string(), verbose: false })
                    .await
                    .map(|s| {
                        s.into_inner().status.is_none_or(|s| s.state != cri::ContainerState::ContainerRunning as i32)
                    })
                    .unwrap_or(true)
        } else {
            false
        };
        let out = selector.feed(&chunk);
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return Ok(());
        }
        if selector.full() {
            return Ok(());
        }
        if rotated && chunk.is_empty() {
            // The old file is read to its end: go on with the new one.
            file = tokio::fs::File::open(path).await?;
            ino = file.metadata().await?.ino();
            offset = 0;
            continue;
        }
        if ended {
            return Ok(());
        }
        if chunk.is_empty() {
            if tx.is_closed() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_node_subresources_as_the_kubelets() {
        assert_eq!(attributes(&Method::GET, "/stats/summary"), ("get", "stats"));
        assert_eq!(attributes(&Method::GET, "/metrics/resource"), ("get", "metrics"));
        assert_eq!(attributes(&Method::GET, "/metrics"), ("get", "metrics"));
        assert_eq!(attributes(&Method::GET, "/logs/"), ("get", "log"));
        assert_eq!(attributes(&Method::POST, "/exec/ns/p/c"), ("create", "proxy"));
        assert_eq!(attributes(&Method::GET, "/containerLogs/ns/p/c"), ("get", "proxy"));
        assert_eq!(attributes(&Method::GET, "/statsx"), ("get", "proxy"));
    }

    #[test]
    fn queries_decode() {
        let q = query_pairs("command=sh&command=-c&command=echo%20hi%3B+exit%203&input=1&tty=true");
        let cmd: Vec<&str> = q.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.as_str()).collect();
        assert_eq!(cmd, ["sh", "-c", "echo hi; exit 3"]);
        assert!(flag(&q, &["input"]) && flag(&q, &["tty"]) && !flag(&q, &["output"]));
    }

    #[test]
    fn a_self_signed_certificate_serves() {
        let (cert, key) = self_signed("node-1", "127.0.0.1").unwrap();
        tls_config(Serving::Fixed(cert.clone().into_bytes(), key.clone().into_bytes()), &[]).unwrap();
        assert!(tls_config(Serving::Fixed(b"junk".to_vec(), key.into_bytes()), &[]).is_err());
    }
}
