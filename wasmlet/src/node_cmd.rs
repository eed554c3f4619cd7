//! `wasmlet node`: the runtime and the kubelet side as one node. With `--kubeconfig` it joins
//! a cluster (registers the Node, renews its Lease, posts its status, runs the pods bound to
//! it); with `--pod-manifest-path` it runs static pods; both at once work too.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use tokio::sync::mpsc;
use wasmlet_kubelet::node::api::{ApiPods, ApiRecorder, StatusManager};
use wasmlet_kubelet::node::services::ServiceRoute;
use wasmlet_kubelet::node::{NodeAgent, NodeConfig};
use wasmlet_kubelet::pods::PodManager;
use wasmlet_kubelet::static_pods;
use wasmlet_runtime::net::services::{Protocol, ServicePortSpec};

use crate::local_node::{Identity, LocalNode, hostname};

/// What `wasmlet node` was asked to do.
pub struct NodeArgs {
    pub kubeconfig: Option<PathBuf>,
    pub bootstrap_kubeconfig: Option<PathBuf>,
    pub pod_manifest_path: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub node_ip: Option<String>,
    pub config: NodeConfig,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub runtime: wasmlet_runtime::RuntimeOptions,
}

/// The node's address: the flag, else the first non-loopback IPv4 address its host name
/// resolves to, else loopback (as the kubelet looks up its hostname first).
fn node_ip(flag: Option<&str>, host: &str) -> Result<String> {
    if let Some(ip) = flag {
        ip.parse::<std::net::IpAddr>().map_err(|_| anyhow::anyhow!("--node-ip {ip:?} is not an IP address"))?;
        return Ok(ip.to_string());
    }
    let found = std::net::ToSocketAddrs::to_socket_addrs(&(host, 0))
        .ok()
        .into_iter()
        .flatten()
        .map(|a| a.ip())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback());
    Ok(found.map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string()))
}

/// Starts the node's HTTPS API (logs, exec, port-forward) on `address:port`, and with
/// serverTLSBootstrap the task that keeps its certificate issued.
async fn node_api(
    cfg: &NodeConfig,
    client: kube::Client,
    kubeconfig: &std::path::Path,
    socket: &std::path::Path,
    cert_dir: &std::path::Path,
    (name, ip): (&str, &str),
    storage: tokio::sync::watch::Receiver<std::sync::Arc<wasmlet_kubelet::eviction::Storage>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    use anyhow::Context;
    use wasmlet_kubelet::node::server;
    let serving = match (&cfg.tls_cert_file, &cfg.tls_private_key_file) {
        (Some(c), Some(k)) => server::Serving::Fixed(
            std::fs::read(c).with_context(|| format!("tlsCertFile {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("tlsPrivateKeyFile {}", k.display()))?,
        ),
        _ if cfg.server_tls_bootstrap => {
            use wasmlet_kubelet::node::serving;
            let cert = Arc::new(serving::ServingCertificate::load(&serving::serving_pem(cert_dir)));
            let mut ips: Vec<std::net::IpAddr> = ip.parse().into_iter().collect();
            if let Ok(a) = cfg.address.parse::<std::net::IpAddr>()
                && !a.is_unspecified()
                && !ips.contains(&a)
            {
                ips.push(a);
            }
            let purpose = wasmlet_kubelet::node::bootstrap::Purpose::Serving { ips, names: vec![name.to_string()] };
            tasks.push(tokio::spawn(serving::keep(cert.clone(), client.clone(), name.to_string(), purpose)));
            server::Serving::Issued(cert)
        }
        _ => {
            let (c, k) = server::self_signed(name, ip)?;
            server::Serving::Fixed(c.into_bytes(), k.into_bytes())
        }
    };
    // Client certificates chain to the clientCAFile, else to the cluster's CA.
    let client_cas: Vec<Vec<u8>> = match &cfg.authentication.x509.client_ca_file {
        Some(f) => {
            let pem = std::fs::read(f).with_context(|| format!("clientCAFile {}", f.display()))?;
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("clientCAFile {}: {e}", f.display()))?
        }
        None => wasmlet_kubelet::node::client::load(kubeconfig, "kubeconfig").await?.1.root_cert.unwrap_or_default(),
    };
    let tls = server::tls_config(serving, &client_cas)?;
    let addr = std::net::SocketAddr::new(cfg.address.parse()?, cfg.port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("node API on {addr}"))?;
    let channel = cri_proto::connect_unix(socket).await.context("connect the node API to the CRI")?;
    let srv = Arc::new(server::NodeServer {
        client,
        cri: wasmlet_kubelet::cri::Cri::new(channel),
        node_name: name.to_string(),
        started: std::time::SystemTime::now(),
        config: cfg.clone(),
        storage,
    });
    tracing::info!(address = %addr, "node API listening");
    tasks.push(tokio::spawn(server::serve(listener, tls, srv)));
    Ok(tasks)
}

/// A route as the runtime's Service table takes it.
fn service_port(r: ServiceRoute) -> ServicePortSpec {
    ServicePortSpec {
        name: r.name,
        cluster_ip: r.cluster_ip,
        port: r.port,
        protocol: match r.protocol {
            wasmlet_kubelet::node::services::Protocol::Tcp => Protocol::Tcp,
            wasmlet_kubelet::node::services::Protocol::Udp => Protocol::Udp,
        },
        endpoints: r.endpoints,
        affinity: r.affinity,
    }
}

pub async fn run(a: NodeArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if a.kubeconfig.is_none() && a.pod_manifest_path.is_none() {
        bail!("wasmlet node needs --kubeconfig (join a cluster), --pod-manifest-path (static pods), or both");
    }
    a.config.check().map_err(|e| anyhow::anyhow!("config [node]: {e}"))?;
    let host = hostname();
    let name = a.hostname_override.clone().unwrap_or_else(|| host.clone()).to_lowercase();
    let ip = node_ip(a.node_ip.as_deref(), &host)?;
    if let Some(bootstrap) = &a.bootstrap_kubeconfig {
        let Some(kubeconfig) = &a.kubeconfig else {
            bail!("--bootstrap-kubeconfig needs --kubeconfig: where to write the node's own credentials")
        };
        wasmlet_kubelet::node::bootstrap::bootstrap(bootstrap, kubeconfig, &a.root.join("pki"), &name).await?;
    }
    let cert_dir = a.root.join("pki");
    let mut tasks = Vec::new();
    let client = match &a.kubeconfig {
        Some(k) => {
            let managed = wasmlet_kubelet::node::bootstrap::client_pem(&cert_dir);
            let c = wasmlet_kubelet::node::client::connect(k, &a.config, &managed).await?;
            if let Some(cert) = c.certificate.filter(|_| a.config.rotate_certificates) {
                tasks.push(tokio::spawn(wasmlet_kubelet::node::client::rotate(cert, c.client.clone(), name.clone())));
            }
            Some(c.client)
        }
        None => None,
    };
    let recorder: Arc<dyn wasmlet_kubelet::events::Recorder> = match &client {
        Some(c) => Arc::new(ApiRecorder::start(c.clone(), name.clone())),
        None => Arc::new(static_pods::TracingRecorder),
    };
    let identity = Identity {
        node_name: name.clone(),
        host_ip: ip.clone(),
        cluster_dns: a.config.cluster_dns.clone(),
        cluster_domain: a.config.cluster_domain.clone(),
    };
    let api_objects = client.as_ref().map(|c| Arc::new(wasmlet_kubelet::node::objects::ApiObjects::new(c.clone())));
    let objects: Arc<dyn wasmlet_kubelet::worker::Objects> = match &api_objects {
        Some(o) => o.clone(),
        None => Arc::new(wasmlet_kubelet::worker::StaticObjects::default()),
    };
    let local = LocalNode::start(&a.root, &a.run_dir, a.runtime, identity, recorder.clone(), objects).await?;
    let node = local.node.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut manager = PodManager::new(node.clone());
    let eviction = a.config.eviction().map_err(|e| anyhow::anyhow!("config [node]: {e}"))?;
    let image_gc = a.config.image_gc().map_err(|e| anyhow::anyhow!("config [node]: {e}"))?;
    let (pressure_tx, pressure) = tokio::sync::watch::channel(Default::default());
    let (storage_tx, storage) = tokio::sync::watch::channel(Default::default());
    if let Some(client) = &client {
        // The kubelet's hostname label and address follow --hostname-override.
        let facts = wasmlet_kubelet::node::gather_facts(&name, &name, &ip, &a.root);
        let agent = Arc::new(
            NodeAgent::new(client.clone(), a.config.clone(), facts, node.cri.clone()).with_pressure(pressure.clone()),
        );
        tracing::info!(node = %name, ip = %ip, "joining the cluster");
        agent.register().await;
        let mut admitter =
            wasmlet_kubelet::node::api::NodeAdmitter::start(client.clone(), &a.config, &agent.facts).await;
        admitter.pressure = pressure.clone();
        manager.admit_with(Arc::new(admitter));
        tasks.push(tokio::spawn(agent.clone().run_status()));
        let kubeconfig = a.kubeconfig.as_deref().expect("a client comes from a kubeconfig");
        let api = node_api(&a.config, client.clone(), kubeconfig, &local.socket, &cert_dir, (&name, &ip), storage);
        tasks.extend(api.await?);
        tasks.push(tokio::spawn(agent.clone().run_lease()));
        // Guests reach Services through the runtime's table: no kube-proxy on this node.
        let table = local.services.clone();
        let sink =
            Arc::new(move |routes: Vec<ServiceRoute>| table.replace(routes.into_iter().map(service_port).collect()));
        let o = api_objects.as_ref().expect("a client has its API objects");
        let (services, changed) = o.services_watch();
        tasks.push(tokio::spawn(wasmlet_kubelet::node::services::watch(client.clone(), services, changed, sink)));
        // No pod's environment is built before the Services are known.
        if let Some(o) = &api_objects {
            o.synced().await;
        }
        let (pods, mirrors) = (ApiPods::default(), ApiPods::default());
        manager.expect(wasmlet_kubelet::pods::Source::Api);
        manager.observe(Arc::new(StatusManager {
            client: client.clone(),
            pods: pods.clone(),
            events: node.events.clone(),
        }));
        tasks.push(tokio::spawn(wasmlet_kubelet::node::api::watch_pods(
            client.clone(),
            name.clone(),
            pods,
            mirrors.clone(),
            tx.clone(),
        )));
        if a.pod_manifest_path.is_some() {
            manager.observe(Arc::new(wasmlet_kubelet::node::mirror::MirrorPods {
                client: client.clone(),
                mirrors,
                node_name: name.clone(),
                node_uid: agent.uid.clone(),
            }));
        }
    } else {
        local.collect_leftovers().await;
    }
    let log_policy = a.config.log_policy().map_err(|e| anyhow::anyhow!("config [node]: {e}"))?;
    tasks.push(local.log_rotation(log_policy).await?);
    let allocatable_memory =
        wasmlet_kubelet::node::memory_total().unwrap_or(0).saturating_sub(a.config.reserved_memory());
    let evictions =
        wasmlet_kubelet::eviction::Node { pods: node.clone(), image_root: a.root.clone(), allocatable_memory };
    let images = Arc::new(wasmlet_kubelet::imagegc::ImageGc::new(image_gc, node.cri.clone(), a.root.clone(), recorder));
    tasks.push(tokio::spawn(wasmlet_kubelet::imagegc::run(images.clone())));
    let evicting =
        wasmlet_kubelet::eviction::run(eviction, evictions, tx.clone(), pressure_tx, storage_tx, Some(images));
    tasks.push(tokio::spawn(evicting));
    if let Some(dir) = a.pod_manifest_path.clone() {
        manager.expect(wasmlet_kubelet::pods::Source::File);
        tasks.push(tokio::spawn(static_pods::follow(dir, name.clone(), tx.clone())));
    }
    drop(tx);
    let manager = static_pods::manage(node, manager, rx, shutdown).await;
    for t in tasks {
        t.abort();
    }
    local.stop().await;
    drop(manager);
    Ok(())
}
