//! The node's side of the Kubernetes API: registering the Node, renewing its Lease, posting
//! its status (as `kubelet_node_status.go` and the node lease controller do), the pods bound
//! to it ([`api`]), and what pods read from the API (ConfigMaps, Secrets, events).

pub mod api;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod mirror;
pub mod objects;
pub mod server;
pub mod services;
pub mod serving;
pub mod stats;
pub mod status;
pub mod throttle;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

pub use config::NodeConfig;
pub use status::Facts;

use crate::cri::Runtime;

/// What went wrong talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl Error {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Api { what: what.into(), source }
    }
}

/// The HTTP status of an API error, if it is one.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Logs a failure only when it differs from the last one (an API server that stays away
/// is said once, not every retry), and its end once.
#[derive(Default)]
pub struct Complaint {
    last: Option<String>,
}

impl Complaint {
    pub fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let text = format!("{what}: {e}");
        if self.last.as_deref() != Some(text.as_str()) {
            tracing::warn!("{text} (retrying)");
            self.last = Some(text);
        }
    }

    pub fn succeeded(&mut self, what: &str) {
        if self.last.take().is_some() {
            tracing::info!("{what}: working again");
        }
    }
}

/// Back-off between attempts: from 100 ms, doubling, at most 7 s (the kubelet's registration
/// retry).
pub struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { next: Duration::from_millis(100) }
    }
}

impl Retry {
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(7));
        d
    }
}

/// The machine's memory (MemTotal), in bytes.
pub fn memory_total() -> Option<u64> {
    stats::meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

/// Runs `attempt` up to 5 times, 200 ms apart, until it succeeds: how the kubelet retries a
/// node status or Lease update.
async fn five_tries<F: std::future::Future<Output = Result<(), Error>>>(
    mut attempt: impl FnMut() -> F,
) -> Result<(), Error> {
    let mut result = attempt().await;
    for _ in 1..5 {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        result = attempt().await;
    }
    result
}

/// The parts of the facts that do not change while wasmlet runs.
pub fn gather_facts(name: &str, hostname: &str, internal_ip: &str, root: &std::path::Path) -> Facts {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let os_image = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    let memory_bytes = memory_total().unwrap_or(0);
    let ephemeral_storage_bytes = rustix::fs::statvfs(root).map_or(0, |s| s.f_blocks * s.f_frsize);
    Facts {
        name: name.into(),
        hostname: hostname.into(),
        internal_ip: internal_ip.into(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        memory_bytes,
        ephemeral_storage_bytes,
        machine_id: read("/etc/machine-id"),
        system_uuid: read("/sys/class/dmi/id/product_uuid"),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        kernel_version: read("/proc/sys/kernel/osrelease"),
        os_image,
        version: env!("CARGO_PKG_VERSION").into(),
        runtime_problem: None,
        pressure: Default::default(),
    }
}

/// The node agent: registration, lease and status, against one API server.
pub struct NodeAgent {
    pub client: kube::Client,
    pub config: NodeConfig,
    pub facts: Facts,
    pub cri: Runtime,
    /// The registered Node's UID (the Lease's owner).
    pub uid: Arc<std::sync::Mutex<String>>,
    /// The Lease as last written: renewed from it without a read, read again on a conflict.
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// The eviction manager's pressure conditions.
    pressure: tokio::sync::watch::Receiver<crate::eviction::NodePressure>,
}

impl NodeAgent {
    pub fn new(client: kube::Client, config: NodeConfig, facts: Facts, cri: Runtime) -> NodeAgent {
        let pressure = tokio::sync::watch::channel(Default::default()).1;
        NodeAgent { client, config, facts, cri, uid: Default::default(), lease: Default::default(), pressure }
    }

    /// Reports the pressure conditions `pressure` carries.
    pub fn with_pressure(mut self, pressure: tokio::sync::watch::Receiver<crate::eviction::NodePressure>) -> NodeAgent {
        self.pressure = pressure;
        self
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Registers the Node, retrying with back-off until the API server takes it: created, or
    /// an existing Node of this name adopted (its labels reconciled). Returns its UID.
    pub async fn register(&self) -> String {
        let mut retry = Retry::default();
        let mut complaint = Complaint::default();
        loop {
            match self.try_register().await {
                Ok(uid) => {
                    complaint.succeeded("register the node");
                    *self.uid.lock().unwrap_or_else(|e| e.into_inner()) = uid.clone();
                    return uid;
                }
                Err(e) => complaint.failed("register the node", &e),
            }
            tokio::time::sleep(retry.delay()).await;
        }
    }

    async fn try_register(&self) -> Result<String, Error> {
        let mut facts = self.facts.clone();
        facts.runtime_problem = self.cri.readiness_problem().await;
        facts.pressure = *self.pressure.borrow();
        let node = status::node_object(&self.config, &facts, SystemTime::now());
        let name = &self.facts.name;
        match self.nodes().create(&PostParams::default(), &node).await {
            Ok(created) => {
                tracing::info!(node = %name, "node registered");
                // A created Node's status is not taken from the create: post it.
                self.post_status(node.status.as_ref().expect("a status")).await?;
                return Ok(created.metadata.uid.unwrap_or_default());
            }
            Err(e) if api_code(&e) == Some(409) => {}
            Err(e) => return Err(Error::api(format!("create node {name}"))(e)),
        }
        // Adopt the Node already there: the labels the kubelet owns are set again (the taints
        // are left as an admin may have changed them).
        let existing = self.nodes().get(name).await.map_err(Error::api(format!("get node {name}")))?;
        let want = status::labels(&self.config, &self.facts);
        let have = existing.metadata.labels.clone().unwrap_or_default();
        if want.iter().any(|(k, v)| have.get(k) != Some(v)) {
            let patch = serde_json::json!({ "metadata": { "labels": want } });
            self.nodes()
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(Error::api(format!("reconcile the labels of node {name}")))?;
        }
        tracing::info!(node = %name, "node already registered: adopted");
        Ok(existing.metadata.uid.unwrap_or_default())
    }

    async fn post_status(&self, s: &k8s_openapi::api::core::v1::NodeStatus) -> Result<(), Error> {
        let patch = serde_json::json!({ "status": s });
        self.nodes()
            .patch_status(&self.facts.name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(Error::api(format!("update the status of node {}", self.facts.name)))?;
        Ok(())
    }

    /// Every nodeStatusUpdateFrequency: reads the Node, computes the status from it, and
    /// posts it when it differs from what the API shows (heartbeats aside; another component,
    /// such as the node-lifecycle controller marking the node Unknown, counts as a
    /// difference) or nodeStatusReportFrequency passed. A Node deleted meanwhile is
    /// registered again.
    pub async fn run_status(self: Arc<Self>) {
        let mut posted: Option<Instant> = None;
        let mut complaint = Complaint::default();
        loop {
            match self.update_status(&mut posted).await {
                Ok(()) => complaint.succeeded("update the node status"),
                Err(e) => complaint.failed("update the node status", &e),
            }
            tokio::time::sleep(self.config.node_status_update_frequency).await;
        }
    }

    async fn update_status(&self, posted: &mut Option<Instant>) -> Result<(), Error> {
        let name = &self.facts.name;
        let Some(node) = self.nodes().get_opt(name).await.map_err(Error::api(format!("get node {name}")))? else {
            tracing::warn!(node = %name, "the Node was deleted: registering it again");
            self.register().await;
            *posted = Some(Instant::now());
            return Ok(());
        };
        let mut facts = self.facts.clone();
        facts.runtime_problem = self.cri.readiness_problem().await;
        facts.pressure = *self.pressure.borrow();
        let current = node.status.unwrap_or_default();
        let s = status::status(&self.config, &facts, Some(&current), SystemTime::now());
        let due = status::changed(&current, &s)
            || posted.is_none_or(|at| at.elapsed() >= self.config.node_status_report_frequency);
        if !due {
            return Ok(());
        }
        five_tries(|| self.post_status(&s)).await?;
        *posted = Some(Instant::now());
        Ok(())
    }

    /// Keeps the node's Lease in kube-node-lease renewed every leaseDuration/4.
    pub async fn run_lease(self: Arc<Self>) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let mut complaint = Complaint::default();
        loop {
            match five_tries(|| self.renew(&leases)).await {
                Ok(()) => complaint.succeeded("renew the node lease"),
                Err(e) => complaint.failed("renew the node lease", &e),
            }
            // 4% jitter, as the lease controller's.
            let base = self.config.lease_renew_interval();
            let jitter = base.mul_f64(rand::random::<f64>() * 0.04);
            tokio::time::sleep(base + jitter).await;
        }
    }

    async fn renew(&self, leases: &Api<Lease>) -> Result<(), Error> {
        let name = &self.facts.name;
        let now = MicroTime(crate::status::time(SystemTime::now()).0);
        let uid = self.uid.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let owner = (!uid.is_empty()).then(|| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.clone(),
            uid,
            ..Default::default()
        });
        let spec = LeaseSpec {
            holder_identity: Some(name.clone()),
            lease_duration_seconds: Some(self.config.node_lease_duration_seconds as i32),
            renew_time: Some(now),
            ..Default::default()
        };
        let mut cached = self.lease.lock().await;
        if cached.is_none() {
            *cached = leases.get_opt(name).await.map_err(Error::api(format!("get lease kube-node-lease/{name}")))?;
        }
        let written = match cached.take() {
            Some(mut lease) => {
                lease.spec = Some(spec);
                // The owner follows the Node (registered again after an admin deleted it).
                if owner.is_some() {
                    lease.metadata.owner_references = owner.map(|o| vec![o]);
                }
                leases.replace(name, &PostParams::default(), &lease).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some("kube-node-lease".into()),
                        owner_references: owner.map(|o| vec![o]),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                leases.create(&PostParams::default(), &lease).await
            }
        };
        // On an error the next try reads the Lease again.
        *cached = Some(written.map_err(Error::api(format!("renew lease kube-node-lease/{name}")))?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_retry_doubles_to_seven_seconds() {
        let mut r = Retry::default();
        let d: Vec<u64> = (0..8).map(|_| r.delay().as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 6400, 7000]);
    }
}
