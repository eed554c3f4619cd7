//! Pod workers: one task per pod that observes the pod through the CRI, computes the plan
//! ([`actions::compute`]), carries it out (images, volumes, containers, hooks, kills), runs the
//! pod's probes, and publishes the pod's status. Everything the kubelet decides is in the pure
//! modules; this one does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cri_proto::v1 as cri;
use k8s_openapi::api::core::v1::{ConfigMap, Container, LifecycleHandler, Pod, Probe, Secret};
use tokio::sync::{Notify, broadcast, mpsc, watch};

use super::actions::{self, KillReason, Plan, Start, format_pod};
use super::backoff::Backoff;
use super::credentials;
use super::cri::{self as kcri, Cri, SandboxNetwork};
use super::dns::{self, NodeDns};
use super::env::{self, EnvSources};
use super::events::{Event, Kind, Recorder};
use super::images::{self, PullDecision};
use super::model::{self, Instance, Observed, ProbeResults, State, SyncError, is_sidecar};
use super::probe::{self, Outcome, ProbeKind, Seen, Tick, Timing};
use super::prober::{self, Target};
use super::quantity::Quantity;
use super::status;
use super::volumes;

/// The ConfigMaps, Secrets and service account tokens pods read (from manifests, or an API
/// server).
pub trait Objects: Send + Sync {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// A token of the pod's service account for the audience ("" for the API server's),
    /// valid for about `expiration` seconds; None when there is no cluster to ask.
    fn service_account_token(&self, _pod: &Pod, _audience: &str, _expiration: i64) -> Option<String> {
        None
    }
    /// The directory of the PersistentVolume bound to claim `name` in `namespace`.
    fn claim(&self, _namespace: &str, name: &str) -> Result<PathBuf, String> {
        Err(format!("persistentvolumeclaim \"{name}\": claims need a cluster"))
    }
    /// The cluster's Services (for the pods' Service environment variables).
    fn services(&self) -> Vec<k8s_openapi::api::core::v1::Service> {
        Vec::new()
    }
    /// Brings what `pod` refers to up to date before the calls above read it (a cache of an
    /// API server's objects); nothing to do for fixed objects.
    fn refresh<'a>(&'a self, _pod: &'a Pod) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Objects from a fixed list (`wasmlet run`'s manifests).
#[derive(Default)]
pub struct StaticObjects {
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
}

fn same(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, ns: &str, name: &str) -> bool {
    meta.name.as_deref() == Some(name) && meta.namespace.as_deref().unwrap_or("default") == ns
}

impl Objects for StaticObjects {
    fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
        self.config_maps.iter().find(|c| same(&c.metadata, ns, name)).cloned()
    }
    fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.secrets.iter().find(|c| same(&c.metadata, ns, name)).cloned()
    }
}

/// What every pod worker on a node shares.
pub struct Node {
    pub cri: Cri,
    /// The kubelet's own directory: `pods/<uid>/` (volumes, hosts file, termination logs) and
    /// `logs/<ns>_<name>_<uid>/` (the CRI log directories).
    pub root: PathBuf,
    pub node_name: String,
    pub host_ip: String,
    pub events: Arc<dyn Recorder>,
    pub objects: Arc<dyn Objects>,
    pub dns: NodeDns,
    pub allocatable_cpu: Quantity,
    pub allocatable_memory: Quantity,
    /// Sandbox IDs of the runtime's container events (a worker wakes for its own).
    pub runtime_events: broadcast::Sender<String>,
    /// Image pulls: one at a time (serializeImagePulls), within the pull rate limit.
    pub pulls: Puller,
    /// A directory on a tmpfs, for the pods' `medium: Memory` emptyDirs.
    pub memory_root: PathBuf,
}

/// The node's image puller: pulls go one at a time, as with the kubelet's default
/// serializeImagePulls, and each takes a token of the rate limit first.
pub struct Puller {
    queue: tokio::sync::Mutex<()>,
    limiter: Mutex<images::PullLimiter>,
}

impl Default for Puller {
    fn default() -> Self {
        let limiter = images::PullLimiter::new(images::PullLimiter::QPS, images::PullLimiter::BURST, Instant::now());
        Puller { queue: tokio::sync::Mutex::new(()), limiter: Mutex::new(limiter) }
    }
}

impl Puller {
    /// Pulls `image` through `cri` after the pulls queued before it, with each of `creds` in
    /// turn (none: anonymously) until one works; the image reference and how long it took, or
    /// every attempt's error.
    pub async fn pull(
        &self,
        cri: &Cri,
        image: &str,
        creds: Vec<cri::AuthConfig>,
    ) -> Result<(String, images::PullTimes), String> {
        let queued = Instant::now();
        let _turn = self.queue.lock().await;
        if !lock(&self.limiter).try_accept(Instant::now()) {
            return Err("pull QPS exceeded".into());
        }
        let started = Instant::now();
        let auths: Vec<Option<cri::AuthConfig>> =
            if creds.is_empty() { vec![None] } else { creds.into_iter().map(Some).collect() };
        let mut errors = Vec::new();
        for auth in auths {
            match cri.pull(image, auth, None).await {
                Ok(image_ref) => {
                    let times = images::PullTimes { pulling: started.elapsed(), including_waiting: queued.elapsed() };
                    return Ok((image_ref, times));
                }
                Err(e) => errors.push(e.message().to_string()),
            }
        }
        // As Go's aggregate error reads: one error alone, else them all in brackets.
        Err(if errors.len() == 1 { errors.remove(0) } else { format!("[{}]", errors.join(", ")) })
    }
}

impl Node {
    /// Forwards the runtime's container events to the workers, reconnecting the stream if it
    /// ends.
    pub fn watch_runtime_events(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = node.cri.rt.clone().get_container_events(cri::GetEventsRequest {}).await;
                if let Ok(stream) = stream {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(ev)) = stream.message().await {
                        if let Some(s) = ev.pod_sandbox_status {
                            let _ = node.runtime_events.send(s.id);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    pub fn logs_dir(&self, pod: &Pod) -> PathBuf {
        let m = &pod.metadata;
        self.root.join("logs").join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or_default(),
            m.uid.as_deref().unwrap_or_default()
        ))
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid)
    }

    /// Where a pod's `medium: Memory` emptyDirs live: on a tmpfs.
    pub fn memory_dir(&self, uid: &str) -> PathBuf {
        self.memory_root.join(uid)
    }
}

/// A change to a pod.
#[derive(Debug)]
pub enum Update {
    /// A new spec (static pod file changed, API update).
    Spec(Box<Pod>),
    /// Delete gracefully, with this grace period (None: the pod's terminationGracePeriodSeconds).
    Delete { grace: Option<i64> },
}

/// A running pod worker.
pub struct PodHandle {
    pub updates: mpsc::UnboundedSender<Update>,
    /// The pod with its latest status.
    pub status: watch::Receiver<Pod>,
    /// Ends when the pod has been deleted and cleaned up.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a worker for the pod.
pub fn spawn(node: Arc<Node>, pod: Pod) -> PodHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (out, status) = watch::channel(pod.clone());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let w = Worker {
        node,
        uid,
        pod,
        backoff: Backoff::default(),
        pull_backoff: Backoff::default(),
        missing_pull_secrets: Vec::new(),
        probes: Arc::new(Mutex::new(ProbeResults::default())),
        probe_tasks: HashMap::new(),
        views: HashMap::new(),
        wake: Arc::new(Notify::new()),
        sync_errors: HashMap::new(),
        start_time: None,
        status: None,
        net: SandboxNetwork::default(),
        net_of: None,
        terminal: false,
        deadline: false,
        out,
        rx,
    };
    let task = tokio::spawn(w.run());
    PodHandle { updates: tx, status, task }
}

/// What a probe task sees of its container.
#[derive(Debug, Clone, Default)]
struct View {
    seen: Seen,
    target: Target,
}

struct Worker {
    node: Arc<Node>,
    uid: String,
    pod: Pod,
    backoff: Backoff,
    pull_backoff: Backoff,
    /// The imagePullSecrets last reported missing (FailedToRetrieveImagePullSecret is told
    /// once per change, not every sync).
    missing_pull_secrets: Vec<String>,
    probes: Arc<Mutex<ProbeResults>>,
    probe_tasks: HashMap<(String, ProbeKind), tokio::task::JoinHandle<()>>,
    /// Per container name: what its probe tasks see.
    views: HashMap<String, watch::Sender<View>>,
    /// Probe results changed: sync now.
    wake: Arc<Notify>,
    sync_errors: HashMap<String, SyncError>,
    start_time: Option<SystemTime>,
    status: Option<k8s_openapi::api::core::v1::PodStatus>,
    /// The pod's network (IP, namespace) as probes and hooks dial it, and the sandbox it was
    /// read from: read again when the sandbox changes, whoever created it.
    net: SandboxNetwork,
    net_of: Option<String>,
    /// Nothing more will run (completed, failed, or deleted).
    terminal: bool,
    deadline: bool,
    out: watch::Sender<Pod>,
    rx: mpsc::UnboundedReceiver<Update>,
}

/// The resync period when nothing else wakes a worker.
const RESYNC: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn field_path(pod: &Pod, name: &str) -> String {
    let spec = model::spec(pod);
    if spec.init_containers.iter().flatten().any(|c| c.name == name) {
        format!("spec.initContainers{{{name}}}")
    } else {
        format!("spec.containers{{{name}}}")
    }
}

impl Worker {
    fn ns(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    fn event(&self, container: Option<&str>, kind: Kind, reason: &str, message: String) {
        tracing::debug!(pod = %self.name(), ?container, reason, %message, "event");
        self.node.events.record(Event {
            namespace: self.ns().to_string(),
            pod: self.name().to_string(),
            uid: self.uid.clone(),
            field_path: container.map(|c| field_path(&self.pod, c)).unwrap_or_default(),
            kind,
            reason: reason.to_string(),
            message,
            time: SystemTime::now(),
        });
    }

    fn container(&self, name: &str) -> Option<Container> {
        let spec = model::spec(&self.pod);
        spec.init_containers.iter().flatten().chain(spec.containers.iter()).find(|c| c.name == name).cloned()
    }

    fn grace(&self) -> i64 {
        model::spec(&self.pod).termination_grace_period_seconds.unwrap_or(30).max(0)
    }

    async fn run(mut self) {
        let mut deleting: Option<i64> = None;
        let mut events = self.node.runtime_events.subscribe();
        self.start_time = Some(SystemTime::now());
        loop {
            let observed = match self.node.cri.observe(&self.uid).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(pod = %self.name(), error = %e, "observe the pod through the CRI");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // A sandbox this worker did not create (one left running when the kubelet side
            // restarted): its network is read once, for the probes and hooks that dial it.
            if let Some(sandbox) = observed.sandbox.as_ref().filter(|s| s.ready)
                && self.net_of.as_deref() != Some(sandbox.id.as_str())
                && let Ok(net) = self.node.cri.sandbox_network(&sandbox.id).await
            {
                self.net = net;
                self.net_of = Some(sandbox.id.clone());
            }
            if let Some(grace) = deleting {
                self.terminate(&observed, grace, true).await;
                let observed = self.node.cri.observe(&self.uid).await.unwrap_or_default();
                self.publish(&observed);
                self.remove(&observed).await;
                return;
            }
            let mut plan = Plan::default();
            let mut acted = false;
            if !self.terminal {
                if self.deadline_passed() {
                    self.deadline = true;
                    self.event(
                        None,
                        Kind::Normal,
                        "DeadlineExceeded",
                        "Pod was active on the node longer than the specified deadline".into(),
                    );
                    self.terminate(&observed, self.grace(), false).await;
                    acted = true;
                } else {
                    let now = SystemTime::now();
                    let probes = lock(&self.probes).clone();
                    plan = actions::compute(&self.pod, &observed, &probes, &mut self.backoff, now);
                    acted = plan != Plan::default();
                    if plan.init_failed || (plan.kill_pod && !plan.create_sandbox) {
                        self.terminate(&observed, self.grace(), false).await;
                    } else {
                        self.execute(&plan, &observed).await;
                    }
                }
            }
            // Look again only if something was done: a steady pod costs one look per sync.
            let observed = if acted { self.node.cri.observe(&self.uid).await.unwrap_or(observed) } else { observed };
            self.update_views(&observed);
            self.publish(&observed);
            // Sleep until something happens: an update, a probe result, a runtime event for
            // this pod, the end of a back-off, the deadline, or the resync period.
            let mut wake_at = Instant::now() + RESYNC;
            if let Some(until) = plan.wake_at() {
                let d = until.duration_since(SystemTime::now()).unwrap_or_default();
                wake_at = wake_at.min(Instant::now() + d);
            }
            if let Some(d) = self.until_deadline() {
                wake_at = wake_at.min(Instant::now() + d);
            }
            let sandbox = observed.sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default();
            tokio::select! {
                u = self.rx.recv() => match u {
                    Some(Update::Spec(p)) => self.respec(*p),
                    Some(Update::Delete { grace }) => deleting = Some(grace.unwrap_or_else(|| self.grace())),
                    None => deleting = Some(self.grace()),
                },
                _ = self.wake.notified() => {}
                _ = async {
                    loop {
                        match events.recv().await {
                            Ok(id) if id == sandbox => return,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                        }
                    }
                } => {}
                _ = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }

    /// A new spec: the pod keeps its identity; changed containers restart through their hash.
    fn respec(&mut self, pod: Pod) {
        self.pod.spec = pod.spec;
        self.pod.metadata.labels = pod.metadata.labels;
        self.pod.metadata.annotations = pod.metadata.annotations;
    }

    fn until_deadline(&self) -> Option<Duration> {
        let secs = model::spec(&self.pod).active_deadline_seconds?;
        let start = self.start_time?;
        let end = start + Duration::from_secs(secs.max(0) as u64);
        Some(end.duration_since(SystemTime::now()).unwrap_or_default())
    }

    fn deadline_passed(&self) -> bool {
        self.until_deadline().is_some_and(|d| d.is_zero())
    }

    /// Publishes the pod's status when it changed.
    fn publish(&mut self, observed: &Observed) {
        let probes = lock(&self.probes).clone();
        let s = status::generate(&status::Input {
            pod: &self.pod,
            observed,
            probes: &probes,
            sync_errors: &self.sync_errors,
            old: self.status.as_ref(),
            host_ip: &self.node.host_ip,
            start_time: self.start_time,
            terminal: self.terminal,
            deadline_exceeded: self.deadline,
            now: SystemTime::now(),
        });
        if self.status.as_ref() != Some(&s) {
            let mut pod = self.pod.clone();
            pod.status = Some(s.clone());
            self.status = Some(s);
            self.out.send_replace(pod);
        }
    }

    async fn execute(&mut self, plan: &Plan, observed: &Observed) {
        if plan.kill_pod
            && let Some(s) = &observed.sandbox
        {
            self.event(
                None,
                Kind::Normal,
                "SandboxChanged",
                "Pod sandbox changed, it will be killed and re-created.".into(),
            );
            self.kill_all(observed, self.grace()).await;
            let _ = self.node.cri.stop_sandbox(&s.id).await;
        }
        let mut sandbox_id = observed.sandbox.as_ref().filter(|s| s.ready).map(|s| s.id.clone());
        if plan.create_sandbox {
            let attempt = observed.sandbox.as_ref().map_or(0, |s| s.attempt + 1);
            match self.create_sandbox(attempt).await {
                Ok(id) => sandbox_id = Some(id),
                Err(e) => {
                    let message = format!("Failed to create pod sandbox: {e}");
                    self.event(None, Kind::Warning, "FailedCreatePodSandBox", message);
                    return;
                }
            }
        }
        let Some(sandbox_id) = sandbox_id else { return };
        self.node.objects.refresh(&self.pod).await;
        if !self.setup_volumes() {
            return;
        }
        for k in &plan.kills {
            let grace = match k.reason {
                KillReason::Liveness | KillReason::Startup => self.probe_grace(&k.name, k.reason),
                _ => None,
            };
            if let Some(i) = observed.instances.iter().find(|i| i.id == k.id) {
                self.kill_container(i, Some(&k.message), grace.unwrap_or_else(|| self.grace())).await;
            }
        }
        for b in &plan.backing_off {
            let first = self.sync_errors.get(&b.name).is_none_or(|e| e.message != b.message);
            self.sync_errors
                .insert(b.name.clone(), SyncError { reason: "CrashLoopBackOff".into(), message: b.message.clone() });
            if first {
                self.event(
                    Some(&b.name),
                    Kind::Warning,
                    "BackOff",
                    format!("Back-off restarting failed container {} in pod {}", b.name, format_pod(&self.pod)),
                );
            }
        }
        if !plan.starts.is_empty() {
            self.collect_dead(observed).await;
        }
        for s in &plan.starts {
            match self.start(s, &sandbox_id).await {
                Ok(()) => {
                    self.sync_errors.remove(&s.name);
                }
                Err(e) => {
                    self.sync_errors.insert(s.name.clone(), e);
                }
            }
        }
    }

    /// Removes dead instances beyond the newest two of each container (the kubelet's container
    /// GC): a crash-looping container would otherwise pile up records and logs.
    async fn collect_dead(&self, observed: &Observed) {
        for old in model::dead_beyond(observed, 2) {
            if let Err(e) = self.node.cri.remove_container(&old.id).await {
                tracing::debug!(pod = %self.name(), container = %old.name, error = %e, "remove a dead instance");
            }
        }
    }

    fn probe_grace(&self, name: &str, reason: KillReason) -> Option<i64> {
        let c = self.container(name)?;
        let p = match reason {
            KillReason::Liveness => c.liveness_probe,
            _ => c.startup_probe,
        }?;
        p.termination_grace_period_seconds
    }

    fn sandbox_config(&self, attempt: u32) -> (cri::PodSandboxConfig, Vec<dns::Warning>) {
        let pod = &self.pod;
        let spec = model::spec(pod);
        let (hostname, _) = dns::hostname_and_domain(pod, &self.node.dns.cluster_domain);
        let (resolv, warnings) = dns::dns_config(pod, &self.node.dns);
        let host_network = spec.host_network == Some(true);
        let mut port_mappings = Vec::new();
        for c in spec.init_containers.iter().flatten().chain(spec.containers.iter()) {
            for p in c.ports.iter().flatten() {
                let host_port = p.host_port.unwrap_or(0);
                if host_port == 0 || host_network {
                    continue;
                }
                let protocol = match p.protocol.as_deref() {
                    Some("UDP") => cri::Protocol::Udp,
                    Some("SCTP") => cri::Protocol::Sctp,
                    _ => cri::Protocol::Tcp,
                };
                port_mappings.push(cri::PortMapping {
                    protocol: protocol as i32,
                    container_port: p.container_port,
                    host_port,
                    host_ip: p.host_ip.clone().unwrap_or_default(),
                });
            }
        }
        let mode = |node: bool, pod_mode: cri::NamespaceMode| {
            if node { cri::NamespaceMode::Node as i32 } else { pod_mode as i32 }
        };
        let pid_default = if spec.share_process_namespace == Some(true) {
            cri::NamespaceMode::Pod
        } else {
            cri::NamespaceMode::Container
        };
        let mut labels: HashMap<String, String> = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect();
        labels.insert(kcri::POD_NAME.into(), self.name().into());
        labels.insert(kcri::POD_NAMESPACE.into(), self.ns().into());
        labels.insert(kcri::POD_UID.into(), self.uid.clone());
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name().into(),
                uid: self.uid.clone(),
                namespace: self.ns().into(),
                attempt,
            }),
            hostname: if host_network { String::new() } else { hostname },
            log_directory: self.node.logs_dir(pod).display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: resolv.servers,
                searches: resolv.searches,
                options: resolv.options,
            }),
            port_mappings,
            labels,
            annotations: pod.metadata.annotations.clone().unwrap_or_default().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: mode(host_network, cri::NamespaceMode::Pod),
                        pid: mode(spec.host_pid == Some(true), pid_default),
                        ipc: mode(spec.host_ipc == Some(true), cri::NamespaceMode::Pod),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        (config, warnings)
    }

    /// Runs a new sandbox and writes the pod's managed /etc/hosts; returns the sandbox ID.
    async fn create_sandbox(&mut self, attempt: u32) -> Result<String, String> {
        let (config, warnings) = self.sandbox_config(attempt);
        for w in warnings {
            self.event(None, Kind::Warning, w.reason, w.message);
        }
        std::fs::create_dir_all(self.node.logs_dir(&self.pod)).map_err(|e| e.to_string())?;
        let id = self
            .node
            .cri
            .rt
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .pod_sandbox_id;
        self.net = self.node.cri.sandbox_network(&id).await.map_err(|s| s.message().to_string())?;
        self.net_of = Some(id.clone());
        // The kubelet-managed /etc/hosts, mounted into every container.
        let spec = model::spec(&self.pod);
        let hosts = if spec.host_network == Some(true) {
            let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            dns::host_network_hosts_file(&self.pod, &node_hosts)
        } else {
            dns::hosts_file(&self.pod, &self.ips().0, &self.node.dns.cluster_domain)
        };
        let dir = self.node.pod_dir(&self.uid);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("etc-hosts"), hosts).map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// The pod's and the node's addresses, for the downward API.
    fn ips(&self) -> (Vec<String>, Vec<String>) {
        let pod: Vec<String> = [self.net.ip.clone()].into_iter().filter(|s| !s.is_empty()).collect();
        (pod, vec![self.node.host_ip.clone()])
    }

    /// Sets up (or refreshes) every volume; false after a FailedMount.
    fn setup_volumes(&mut self) -> bool {
        let ns = self.ns().to_string();
        let objects = self.node.objects.clone();
        let cms = |n: &str| objects.config_map(&ns, n);
        let secrets = |n: &str| objects.secret(&ns, n);
        let tokens = |audience: &str, expiration: i64| objects.service_account_token(&self.pod, audience, expiration);
        let claims = |name: &str| objects.claim(&ns, name);
        let (pod_ips, host_ips) = self.ips();
        let dir = self.node.pod_dir(&self.uid);
        let memory_dir = self.node.memory_dir(&self.uid);
        let mut failed = Vec::new();
        {
            let sources = volumes::Sources {
                config_maps: &cms,
                secrets: &secrets,
                tokens: &tokens,
                claims: &claims,
                pod_ips: &pod_ips,
                host_ips: &host_ips,
                node_name: &self.node.node_name,
                allocatable_cpu: self.node.allocatable_cpu,
                allocatable_memory: self.node.allocatable_memory,
                memory_dir: &memory_dir,
            };
            for v in model::spec(&self.pod).volumes.iter().flatten() {
                if let Err(e) = volumes::setup(&self.pod, &dir, v, &sources) {
                    failed.push(e.0);
                }
            }
        }
        for message in &failed {
            self.event(None, Kind::Warning, "FailedMount", message.clone());
        }
        failed.is_empty()
    }

    /// Pulls the image as the policy says; returns the image reference.
    async fn ensure_image(&mut self, c: &Container) -> Result<String, SyncError> {
        // The pod's pull secrets are read before anything is pulled, as the kubelet's sync does.
        let (keyring, missing) = credentials::pod_keyring(&self.pod, &|n| self.node.objects.secret(self.ns(), n));
        if !missing.is_empty() && missing != self.missing_pull_secrets {
            self.event(
                None,
                Kind::Warning,
                "FailedToRetrieveImagePullSecret",
                format!(
                    "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                    missing.join(", ")
                ),
            );
        }
        self.missing_pull_secrets = missing;
        let image = images::with_default_tag(c.image.as_deref().unwrap_or_default());
        let shown = c.image.clone().unwrap_or_default();
        let present = self
            .node
            .cri
            .image_status(&image)
            .await
            .map_err(|s| SyncError { reason: "ErrImagePull".into(), message: s.message().to_string() })?;
        match images::decide(images::policy_of(c), present.is_some()) {
            PullDecision::Present => {
                self.event(
                    Some(&c.name),
                    Kind::Normal,
                    "Pulled",
                    format!("Container image \"{shown}\" already present on machine"),
                );
                Ok(present.map(|p| p.0).unwrap_or(image))
            }
            PullDecision::NeverPull => {
                let message = format!("Container image \"{shown}\" is not present with pull policy of Never");
                self.event(Some(&c.name), Kind::Warning, "ErrImageNeverPull", message.clone());
                Err(SyncError { reason: "ErrImageNeverPull".into(), message })
            }
            PullDecision::Pull => {
                let key = format!("{}_{image}", self.uid);
                let now = SystemTime::now();
                if self.pull_backoff.in_backoff_since_update(&key, now) {
                    let message = format!("Back-off pulling image \"{shown}\"");
                    self.event(Some(&c.name), Kind::Normal, "BackOff", message.clone());
                    self.event(Some(&c.name), Kind::Warning, "Failed", "Error: ImagePullBackOff".into());
                    return Err(SyncError { reason: "ImagePullBackOff".into(), message });
                }
                self.event(Some(&c.name), Kind::Normal, "Pulling", format!("Pulling image \"{shown}\""));
                match self.node.pulls.pull(&self.node.cri, &image, keyring.lookup(&image)).await {
                    Ok((r, times)) => {
                        let size = self.node.cri.image_status(&image).await.ok().flatten().map_or(0, |p| p.1);
                        // Go's durations, truncated to the millisecond.
                        let ms = |d: Duration| actions::go_duration(Duration::from_millis(d.as_millis() as u64));
                        self.event(
                            Some(&c.name),
                            Kind::Normal,
                            "Pulled",
                            format!(
                                "Successfully pulled image \"{shown}\" in {} ({} including waiting). Image size: {size} bytes.",
                                ms(times.pulling),
                                ms(times.including_waiting)
                            ),
                        );
                        Ok(r)
                    }
                    Err(message) => {
                        self.pull_backoff.next(&key, now, now);
                        self.event(
                            Some(&c.name),
                            Kind::Warning,
                            "Failed",
                            format!("Failed to pull image \"{shown}\": {message}"),
                        );
                        self.event(Some(&c.name), Kind::Warning, "Failed", "Error: ErrImagePull".into());
                        Err(SyncError { reason: "ErrImagePull".into(), message })
                    }
                }
            }
        }
    }

    /// The container's CRI config (CreateContainerConfigError on failure).
    fn container_config(
        &self,
        c: &Container,
        restart_count: i32,
        image_ref: &str,
    ) -> Result<cri::ContainerConfig, String> {
        let ns = self.ns().to_string();
        let objects = self.node.objects.clone();
        let cms = |n: &str| objects.config_map(&ns, n);
        let secrets = |n: &str| objects.secret(&ns, n);
        let (pod_ips, host_ips) = self.ips();
        let links = model::spec(&self.pod).enable_service_links != Some(false);
        let services = env::service_env(&objects.services(), &ns, links);
        let envs = env::build(
            c,
            &EnvSources {
                pod: &self.pod,
                pod_ips: &pod_ips,
                host_ips: &host_ips,
                node_name: &self.node.node_name,
                allocatable_cpu: self.node.allocatable_cpu,
                allocatable_memory: self.node.allocatable_memory,
                config_maps: &cms,
                secrets: &secrets,
                services: &services,
            },
        )
        .map_err(|e| e.0)?;
        let command = env::expand_all(c.command.as_deref().unwrap_or_default(), &envs);
        let args = env::expand_all(c.args.as_deref().unwrap_or_default(), &envs);
        let pod_dir = self.node.pod_dir(&self.uid);
        let spec = model::spec(&self.pod);
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .ok_or_else(|| format!("cannot find volume {:?} to mount into container {:?}", m.name, c.name))?;
            // Set up earlier in this sync: only where it lives is needed here.
            let ready = volumes::location(&pod_dir, v);
            let mut host = ready.host_path.clone();
            let sub = match (&m.sub_path, &m.sub_path_expr) {
                (Some(s), _) if !s.is_empty() => Some(s.clone()),
                (_, Some(e)) if !e.is_empty() => {
                    let lookup = |n: &str| envs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                    let expanded = env::expand(e, &lookup);
                    if expanded.contains("$(") {
                        return Err(format!("failed to prepare subPath for volumeMount {:?}: missing value", m.name));
                    }
                    Some(expanded)
                }
                _ => None,
            };
            if let Some(sub) = sub {
                volumes::check_relative(&sub).map_err(|e| format!("subPath {e}"))?;
                host = host.join(&sub);
                if !host.exists() {
                    std::fs::create_dir_all(&host).map_err(|e| format!("create subPath {}: {e}", host.display()))?;
                }
            }
            mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only == Some(true) || ready.read_only,
                ..Default::default()
            });
        }
        if !mounts.iter().any(|m| m.container_path == "/etc/hosts") {
            let hosts = pod_dir.join("etc-hosts");
            if hosts.exists() {
                mounts.push(cri::Mount {
                    container_path: "/etc/hosts".into(),
                    host_path: hosts.display().to_string(),
                    ..Default::default()
                });
            }
        }
        let termination_path = c.termination_message_path.clone().unwrap_or_else(|| "/dev/termination-log".into());
        let mut annotations: HashMap<String, String> = HashMap::new();
        if !termination_path.is_empty() {
            let dir = pod_dir.join("containers").join(&c.name);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let file = dir.join(format!("{:08x}", rand::random::<u32>()));
            std::fs::write(&file, b"").map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666));
            mounts.push(cri::Mount {
                container_path: termination_path.clone(),
                host_path: file.display().to_string(),
                ..Default::default()
            });
            annotations.insert(kcri::TERMINATION_MESSAGE_PATH.into(), termination_path);
        }
        annotations.insert(
            "io.kubernetes.container.terminationMessagePolicy".into(),
            c.termination_message_policy.clone().unwrap_or_else(|| "File".into()),
        );
        annotations.insert(kcri::CONTAINER_HASH.into(), model::container_hash(c));
        annotations.insert(kcri::RESTART_COUNT.into(), restart_count.to_string());
        annotations.insert("io.kubernetes.pod.terminationGracePeriod".into(), self.grace().to_string());
        let labels: HashMap<String, String> = [
            (kcri::CONTAINER_NAME.to_string(), c.name.clone()),
            (kcri::POD_NAME.to_string(), self.name().to_string()),
            (kcri::POD_NAMESPACE.to_string(), self.ns().to_string()),
            (kcri::POD_UID.to_string(), self.uid.clone()),
        ]
        .into();
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let limit = |k: &str| limits.and_then(|l| l.get(k)).and_then(|q| Quantity::parse(&q.0).ok());
        let memory = limit("memory").map_or(0, |q| q.ceil_units() as i64);
        let cpu_quota = limit("cpu").map_or(0, |q| q.ceil_millis() as i64 * 100);
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: c.name.clone(), attempt: restart_count as u32 }),
            image: Some(cri::ImageSpec {
                image: image_ref.to_string(),
                user_specified_image: c.image.clone().unwrap_or_default(),
                ..Default::default()
            }),
            command,
            args,
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: envs.into_iter().map(|(key, value)| cri::KeyValue { key, value }).collect(),
            mounts,
            labels,
            annotations,
            log_path: format!("{}/{restart_count}.log", c.name),
            stdin: c.stdin == Some(true),
            stdin_once: c.stdin_once == Some(true),
            tty: c.tty == Some(true),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: memory,
                    cpu_period: if cpu_quota > 0 { 100_000 } else { 0 },
                    cpu_quota,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Creates and starts one container, then runs its postStart hook.
    async fn start(&mut self, s: &Start, sandbox_id: &str) -> Result<(), SyncError> {
        let Some(c) = self.container(&s.name) else { return Ok(()) };
        let image_ref = self.ensure_image(&c).await?;
        let config = match self.container_config(&c, s.restart_count, &image_ref) {
            Ok(c) => c,
            Err(message) => {
                self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
                return Err(SyncError { reason: "CreateContainerConfigError".into(), message });
            }
        };
        let (sandbox_config, _) = self.sandbox_config(0);
        let created = self
            .node
            .cri
            .rt
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await;
        let id = match created {
            Ok(r) => r.into_inner().container_id,
            Err(st) => {
                let message = st.message().to_string();
                self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
                return Err(SyncError { reason: "CreateContainerError".into(), message });
            }
        };
        self.event(Some(&c.name), Kind::Normal, "Created", format!("Created container: {}", c.name));
        if let Err(st) =
            self.node.cri.rt.clone().start_container(cri::StartContainerRequest { container_id: id.clone() }).await
        {
            let message = st.message().to_string();
            self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
            return Err(SyncError { reason: "RunContainerError".into(), message });
        }
        self.event(Some(&c.name), Kind::Normal, "Started", format!("Started container {}", c.name));
        self.ensure_probes(&c);
        if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
            let target = Target { net: self.net.clone(), container_id: id.clone() };
            if let Err(e) = self.run_hook(&hook, &c, &target, None).await {
                tracing::info!(pod = %self.name(), container = %c.name, error = %e, "postStart hook failed");
                self.event(Some(&c.name), Kind::Warning, "FailedPostStartHook", "PostStartHook failed".into());
                self.event(Some(&c.name), Kind::Normal, "Killing", "FailedPostStartHook".into());
                let _ = self.node.cri.stop_container(&id, self.grace().max(2)).await;
                return Err(SyncError { reason: "PostStartHookError".into(), message: e });
            }
        }
        Ok(())
    }

    /// Runs a lifecycle handler: exec (no timeout of its own), httpGet (any response is
    /// success), sleep; tcpSocket is refused as the kubelet does.
    async fn run_hook(
        &self,
        h: &LifecycleHandler,
        c: &Container,
        target: &Target,
        limit: Option<Duration>,
    ) -> Result<(), String> {
        let limit = limit.unwrap_or(Duration::from_secs(3600));
        if let Some(e) = &h.exec {
            let cmd = e.command.clone().unwrap_or_default();
            let r = self
                .node
                .cri
                .exec_sync(&target.container_id, cmd.clone(), limit)
                .await
                .map_err(|s| s.message().to_string())?;
            if r.exit_code != 0 {
                let mut out = r.stdout;
                out.extend_from_slice(&r.stderr);
                return Err(format!(
                    "command {cmd:?} exited with {}: {}",
                    r.exit_code,
                    String::from_utf8_lossy(&out[..out.len().min(prober::MAX_OUTPUT)])
                ));
            }
            return Ok(());
        }
        if let Some(g) = &h.http_get {
            if let Some(fallback) = prober::http_hook(target, g, c, limit).await? {
                self.event(Some(&c.name), Kind::Warning, "LifecycleHTTPFallback", fallback);
            }
            return Ok(());
        }
        if let Some(s) = &h.sleep {
            tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(limit)).await;
            return Ok(());
        }
        if h.tcp_socket.is_some() {
            return Err("invalid handler: tcpSocket is not supported for lifecycle hooks".into());
        }
        Err("invalid handler: no action".into())
    }

    /// Stops one container: Killing event, preStop within the grace period, then StopContainer
    /// with what is left (at least 2 s).
    async fn kill_container(&self, i: &Instance, message: Option<&str>, grace: i64) {
        if i.state != State::Running && i.state != State::Unknown && i.state != State::Created {
            return;
        }
        let message = message.map_or_else(|| format!("Stopping container {}", i.name), str::to_string);
        self.event(Some(&i.name), Kind::Normal, "Killing", message);
        let mut grace = grace;
        let pre_stop = self.container(&i.name).and_then(|c| Some((c.lifecycle.clone()?.pre_stop?, c)));
        if let Some((hook, c)) = pre_stop
            && grace > 0
            && i.state == State::Running
        {
            let t0 = Instant::now();
            let target = Target { net: self.net.clone(), container_id: i.id.clone() };
            let limit = Duration::from_secs(grace as u64);
            match tokio::time::timeout(limit, self.run_hook(&hook, &c, &target, Some(limit))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(pod = %self.name(), container = %i.name, error = %e, "preStop hook failed");
                    self.event(Some(&i.name), Kind::Warning, "FailedPreStopHook", "PreStopHook failed".into());
                }
                Err(_) => {
                    tracing::info!(pod = %self.name(), container = %i.name, "preStop hook did not finish within the grace period");
                }
            }
            grace -= t0.elapsed().as_secs() as i64;
        }
        if let Err(e) = self.node.cri.stop_container(&i.id, grace.max(2)).await {
            tracing::warn!(pod = %self.name(), container = %i.name, error = %e, "StopContainer");
        }
    }

    /// Stops every container: app (and regular init) containers in parallel, then sidecars in
    /// reverse order.
    async fn kill_all(&self, observed: &Observed, grace: i64) {
        let spec = model::spec(&self.pod);
        let sidecars: Vec<&Container> = spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)).collect();
        let running: Vec<&Instance> = observed.instances.iter().filter(|i| i.state == State::Running).collect();
        let first: Vec<_> = running
            .iter()
            .filter(|i| !sidecars.iter().any(|s| s.name == i.name))
            .map(|i| self.kill_container(i, None, grace))
            .collect();
        futures_util::future::join_all(first).await;
        for s in sidecars.iter().rev() {
            if let Some(i) = running.iter().find(|i| i.name == s.name) {
                self.kill_container(i, None, grace).await;
            }
        }
    }

    /// Ends the pod: stops probes that must stop, kills everything, stops the sandbox. The pod
    /// keeps its status; nothing restarts.
    async fn terminate(&mut self, observed: &Observed, grace: i64, deleting: bool) {
        self.terminal = true;
        if deleting {
            self.pod.metadata.deletion_timestamp = Some(status::time(SystemTime::now()));
            self.pod.metadata.deletion_grace_period_seconds = Some(grace);
            self.update_views(observed);
        }
        self.kill_all(observed, grace).await;
        if let Some(s) = &observed.sandbox {
            let _ = self.node.cri.stop_sandbox(&s.id).await;
        }
        for (_, t) in self.probe_tasks.drain() {
            t.abort();
        }
    }

    /// Removes the pod's containers, sandboxes and files (after deletion).
    async fn remove(&mut self, observed: &Observed) {
        let mut rt = self.node.cri.rt.clone();
        for i in &observed.instances {
            let _ = rt.remove_container(cri::RemoveContainerRequest { container_id: i.id.clone() }).await;
        }
        let selector: HashMap<String, String> = [(kcri::POD_UID.to_string(), self.uid.clone())].into();
        if let Ok(list) = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter { label_selector: selector, ..Default::default() }),
            })
            .await
        {
            for s in list.into_inner().items {
                let _ = self.node.cri.stop_sandbox(&s.id).await;
                let _ = self.node.cri.remove_sandbox(&s.id).await;
            }
        }
        let _ = std::fs::remove_dir_all(self.node.pod_dir(&self.uid));
        let _ = std::fs::remove_dir_all(self.node.memory_dir(&self.uid));
    }

    /// Starts the probe tasks of a container that has probes (once).
    fn ensure_probes(&mut self, c: &Container) {
        let kinds: [(ProbeKind, Option<&Probe>); 3] = [
            (ProbeKind::Startup, c.startup_probe.as_ref()),
            (ProbeKind::Liveness, c.liveness_probe.as_ref()),
            (ProbeKind::Readiness, c.readiness_probe.as_ref()),
        ];
        let view = self.views.entry(c.name.clone()).or_insert_with(|| watch::channel(View::default()).0).clone();
        for (kind, p) in kinds {
            let Some(p) = p else { continue };
            let key = (c.name.clone(), kind);
            if self.probe_tasks.get(&key).is_some_and(|t| !t.is_finished()) {
                continue;
            }
            lock(&self.probes).declare(&c.name, kind);
            let task = ProbeTask {
                kind,
                probe: p.clone(),
                container: c.clone(),
                cri: self.node.cri.clone(),
                events: self.node.events.clone(),
                pod: (self.ns().to_string(), self.name().to_string(), self.uid.clone(), field_path(&self.pod, &c.name)),
                results: self.probes.clone(),
                wake: self.wake.clone(),
                view: view.subscribe(),
            };
            self.probe_tasks.insert(key, prober::spawn(task.run()));
        }
    }

    /// Tells the probe tasks what their containers look like now.
    fn update_views(&mut self, observed: &Observed) {
        let spec = model::spec(&self.pod);
        let deleting = self.pod.metadata.deletion_timestamp.is_some();
        let probes = lock(&self.probes).clone();
        let never = model::restart_policy(spec) == "Never";
        let pod_terminal = self.terminal && !deleting;
        for (name, tx) in &self.views {
            let latest = observed.latest(name);
            let seen = Seen {
                id: latest.map(|i| i.id.clone()),
                running_since: latest.filter(|i| i.state == State::Running).and_then(|i| i.started_at),
                terminated: latest.is_some_and(|i| i.exited()),
                started: latest.is_some_and(|i| probes.started(name, i)),
                deleting,
                restart_never: never,
                pod_terminal,
            };
            let target = Target { net: self.net.clone(), container_id: seen.id.clone().unwrap_or_default() };
            tx.send_replace(View { seen, target });
        }
    }
}

/// One probe worker: (container, probe type).
struct ProbeTask {
    kind: ProbeKind,
    probe: Probe,
    container: Container,
    cri: Cri,
    events: Arc<dyn Recorder>,
    /// Namespace, name, UID and the container's field path, for events.
    pod: (String, String, String, String),
    results: Arc<Mutex<ProbeResults>>,
    wake: Arc<Notify>,
    view: watch::Receiver<View>,
}

impl ProbeTask {
    async fn run(mut self) {
        let timing = Timing::of(&self.probe, self.kind);
        let mut w = probe::Worker::new(self.kind, timing);
        let name = self.container.name.clone();
        let mut next_run = tokio::time::Instant::now();
        let mut last_id: Option<String> = None;
        loop {
            let due = tokio::select! {
                _ = tokio::time::sleep_until(next_run) => true,
                changed = self.view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
            };
            let view = self.view.borrow_and_update().clone();
            let now = SystemTime::now();
            let (tick, changed) = w.tick(&view.seen, now);
            if changed {
                self.publish(&w);
            }
            // Readiness runs at once on a new container, as the kubelet triggers it.
            let new_container = view.seen.id != last_id && view.seen.running_since.is_some();
            let run_now = due || (new_container && self.kind == ProbeKind::Readiness);
            if view.seen.running_since.is_some() {
                last_id = view.seen.id.clone();
            }
            match tick {
                Tick::Stop => return,
                Tick::Run if run_now => {
                    let (outcome, output) = self.run_with_retries(&view.target, timing.timeout).await;
                    match outcome {
                        Outcome::Failure => self.event(
                            Kind::Warning,
                            "Unhealthy",
                            format!("{} probe failed: {}", self.kind.title(), output.trim_end()),
                        ),
                        Outcome::Warning => self.event(
                            Kind::Warning,
                            "ProbeWarning",
                            format!("{} probe warning: {}", self.kind.title(), output.trim_end()),
                        ),
                        _ => {}
                    }
                    if w.record(outcome) {
                        self.publish(&w);
                    }
                    next_run = tokio::time::Instant::now() + timing.period;
                }
                _ if due => next_run = tokio::time::Instant::now() + timing.period,
                _ => {}
            }
            let _ = &name;
        }
    }

    fn publish(&self, w: &probe::Worker) {
        lock(&self.results).set(&self.container.name, self.kind, w.container_id(), w.published());
        self.wake.notify_one();
    }

    fn event(&self, kind: Kind, reason: &str, message: String) {
        let (ns, pod, uid, field) = &self.pod;
        self.events.record(Event {
            namespace: ns.clone(),
            pod: pod.clone(),
            uid: uid.clone(),
            field_path: field.clone(),
            kind,
            reason: reason.into(),
            message,
            time: SystemTime::now(),
        });
    }

    /// Runs the probe; errors (not failures) are retried up to 3 times.
    async fn run_with_retries(&self, target: &Target, timeout: Duration) -> (Outcome, String) {
        let mut last = (Outcome::Unknown, String::new());
        for _ in 0..3 {
            last = self.run_once(target, timeout).await;
            if last.0 != Outcome::Unknown {
                break;
            }
        }
        last
    }

    async fn run_once(&self, target: &Target, timeout: Duration) -> (Outcome, String) {
        let p = &self.probe;
        let c = &self.container;
        if let Some(e) = &p.exec {
            prober::exec(&self.cri, target, e, c, timeout).await
        } else if let Some(h) = &p.http_get {
            prober::http_probe(target, h, c, timeout).await
        } else if let Some(t) = &p.tcp_socket {
            prober::tcp(target, t, c, timeout).await
        } else if let Some(g) = &p.grpc {
            prober::grpc(target, g, timeout).await
        } else {
            (Outcome::Unknown, "probe has no handler".into())
        }
    }
}

/// Pods by name, for the CLI.
pub type Pods = BTreeMap<String, PodHandle>;
