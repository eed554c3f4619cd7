//! Pod workers: one task per pod that observes the pod through the CRI, computes the plan
//! ([`actions::compute`]), carries it out (images, volumes, containers, hooks, kills), runs the
//! pod's probes, and publishes the pod's status. Everything the kubelet decides is in the pure
//! modules; this one does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

use super::actions::{self, KillReason, Plan, format_pod};
use super::backoff::Backoff;
use super::cri::SandboxNetwork;
use super::events::{Event, Kind};
use super::model::{self, Observed, ProbeResults, SyncError};
use super::probe::ProbeKind;
use super::status;
use crate::clock;

mod containers;
mod node;
mod objects;
mod probes;
mod pull;
mod sandbox;

pub use node::Node;
pub use objects::{Objects, StaticObjects};
use probes::View;
pub use pull::Puller;

/// A change to a pod.
#[derive(Debug)]
pub enum Update {
    /// A new spec (static pod file changed, API update).
    Spec(Box<Pod>),
    /// Delete gracefully, with this grace period (None: the pod's terminationGracePeriodSeconds).
    Delete { grace: Option<i64> },
    /// The eviction manager ends the pod as Failed (reason Evicted); it stays until deleted.
    Evict(crate::eviction::Eviction),
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
        first_seen: Some((Instant::now(), Duration::ZERO)),
        status: None,
        net: SandboxNetwork::default(),
        net_of: None,
        terminal: false,
        failed: None,
        evict: None,
        out,
        rx,
    };
    let task = tokio::spawn(w.run());
    PodHandle { updates: tx, status, task }
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
    /// When the worker first saw the pod, and how long its image pulls took, for the pod
    /// start metrics; `None` once the pod has run.
    first_seen: Option<(Instant, Duration)>,
    status: Option<k8s_openapi::api::core::v1::PodStatus>,
    /// The pod's network (IP, namespace) as probes and hooks dial it, and the sandbox it was
    /// read from: read again when the sandbox changes, whoever created it.
    net: SandboxNetwork,
    net_of: Option<String>,
    /// Nothing more will run (completed, failed, or deleted).
    terminal: bool,
    /// Why the kubelet ended the pod as Failed (its deadline passed, evicted).
    failed: Option<status::Failure>,
    /// An eviction to carry out at the next sync.
    evict: Option<crate::eviction::Eviction>,
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
            time: clock::now(),
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
        self.start_time = Some(clock::now());
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
                if let Some(e) = self.evict.take() {
                    self.event(None, Kind::Warning, crate::eviction::REASON, e.message.clone());
                    self.failed = Some(status::Failure {
                        reason: crate::eviction::REASON.into(),
                        message: e.message,
                        disruption: e.pressure,
                    });
                    self.terminate(&observed, e.grace, false).await;
                    // What it held on the node's disk and memory goes with its containers.
                    self.remove_volumes();
                    acted = true;
                } else if self.deadline_passed() {
                    let f = status::Failure::deadline();
                    self.event(None, Kind::Normal, &f.reason, f.message.clone());
                    self.failed = Some(f);
                    self.terminate(&observed, self.grace(), false).await;
                    acted = true;
                } else {
                    let now = clock::now();
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
                let d = until.duration_since(clock::now()).unwrap_or_default();
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
                    Some(Update::Evict(e)) => self.evict = Some(e),
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
                _ = tokio::time::sleep_until(wake_at) => {}
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
        Some(end.duration_since(clock::now()).unwrap_or_default())
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
            failed: self.failed.as_ref(),
            now: clock::now(),
        });
        if s.phase.as_deref() == Some("Running")
            && let Some((seen, pulling)) = self.first_seen.take()
        {
            let took = seen.elapsed();
            crate::metrics::observe(&crate::metrics::POD_START, &[], took);
            crate::metrics::observe(&crate::metrics::POD_START_SLI, &[], took.saturating_sub(pulling));
        }
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
}

/// Pods by name, for the CLI.
pub type Pods = BTreeMap<String, PodHandle>;

#[cfg(test)]
mod tests;
