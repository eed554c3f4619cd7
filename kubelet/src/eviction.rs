//! The eviction manager, as the kubelet's `pkg/kubelet/eviction` does it: every 10 s it
//! observes the node's signals (memory.available, allocatableMemory.available,
//! nodefs/imagefs available and inodesFree), sets MemoryPressure/DiskPressure while a threshold
//! is met (and for evictionPressureTransitionPeriod after), evicts pods whose emptyDir or
//! ephemeral-storage use passed its limit, and under pressure evicts one pod per round, ranked
//! as upstream ranks them. An evicted pod ends Failed with reason `Evicted`.
//!
//! Everything here but [`run`] and the readers at the end is pure.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cri_proto::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::{mpsc, oneshot, watch};

use crate::model;
use crate::pods::PodUpdate;
use crate::quantity::Quantity;

/// How often signals are observed (the kubelet's evictionMonitoringPeriod).
pub const PERIOD: Duration = Duration::from_secs(10);

/// The pod status reason of an evicted pod.
pub const REASON: &str = "Evicted";

/// An eviction signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    MemoryAvailable,
    AllocatableMemoryAvailable,
    NodeFsAvailable,
    NodeFsInodesFree,
    ImageFsAvailable,
    ImageFsInodesFree,
}

/// The node condition a signal's threshold sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pressure {
    Memory,
    Disk,
}

impl Signal {
    const ALL: [Signal; 6] = [
        Signal::MemoryAvailable,
        Signal::AllocatableMemoryAvailable,
        Signal::NodeFsAvailable,
        Signal::NodeFsInodesFree,
        Signal::ImageFsAvailable,
        Signal::ImageFsInodesFree,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory.available",
            Signal::AllocatableMemoryAvailable => "allocatableMemory.available",
            Signal::NodeFsAvailable => "nodefs.available",
            Signal::NodeFsInodesFree => "nodefs.inodesFree",
            Signal::ImageFsAvailable => "imagefs.available",
            Signal::ImageFsInodesFree => "imagefs.inodesFree",
        }
    }

    fn parse(name: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn pressure(self) -> Pressure {
        match self {
            Signal::MemoryAvailable | Signal::AllocatableMemoryAvailable => Pressure::Memory,
            _ => Pressure::Disk,
        }
    }

    /// The resource reclaimed by evicting for this signal, as messages name it.
    pub fn resource(self) -> &'static str {
        match self {
            Signal::MemoryAvailable | Signal::AllocatableMemoryAvailable => "memory",
            Signal::NodeFsAvailable | Signal::ImageFsAvailable => "ephemeral-storage",
            Signal::NodeFsInodesFree | Signal::ImageFsInodesFree => "inodes",
        }
    }
}

/// A threshold's value: a quantity, or a share of the signal's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Quantity(u64),
    Percent(f64),
}

impl Amount {
    fn of(self, capacity: u64) -> u64 {
        match self {
            Amount::Quantity(q) => q,
            Amount::Percent(p) => (capacity as f64 * p / 100.0) as u64,
        }
    }
}

/// One threshold: met while the signal's available amount is below `amount`. Hard ones
/// (`grace` None) act at once; soft ones once met for their grace period.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub signal: Signal,
    pub amount: Amount,
    pub grace: Option<Duration>,
}

impl Threshold {
    pub fn hard(&self) -> bool {
        self.grace.is_none()
    }
}

/// The eviction settings (KubeletConfiguration's eviction* fields, parsed).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub thresholds: Vec<Threshold>,
    /// The grace period of a pod evicted for a soft threshold (evictionMaxPodGracePeriod).
    pub max_pod_grace: i64,
    /// How long a pressure condition stays after its threshold stops being met.
    pub transition: Duration,
}

/// The kubelet's default hard thresholds on Linux.
pub fn default_hard() -> BTreeMap<String, String> {
    [
        ("memory.available", "100Mi"),
        ("nodefs.available", "10%"),
        ("nodefs.inodesFree", "5%"),
        ("imagefs.available", "15%"),
        ("imagefs.inodesFree", "5%"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn amount(signal: &str, value: &str) -> Result<Amount, String> {
    if let Some(p) = value.strip_suffix('%') {
        let p: f64 = p.parse().map_err(|_| format!("{signal}: {value:?} is not a percentage"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("{signal}: {value:?} is not between 0% and 100%"));
        }
        return Ok(Amount::Percent(p));
    }
    let q = Quantity::parse(value).map_err(|e| format!("{signal}: {e}"))?;
    if q.ceil_units() < 0 {
        return Err(format!("{signal}: {value:?} is negative"));
    }
    Ok(Amount::Quantity(q.ceil_units() as u64))
}

/// Parses evictionHard, evictionSoft and evictionSoftGracePeriod as the kubelet does: a soft
/// threshold needs a grace period; a hard memory.available threshold also guards what pods
/// may use (allocatableMemory.available, as with enforceNodeAllocatable "pods").
pub fn parse(
    hard: &BTreeMap<String, String>,
    soft: &BTreeMap<String, String>,
    soft_grace: &BTreeMap<String, String>,
) -> Result<Vec<Threshold>, String> {
    let signal = |name: &str, what: &str| {
        Signal::parse(name).filter(|s| *s != Signal::AllocatableMemoryAvailable).ok_or_else(|| {
            format!("{what}: unknown signal {name:?} (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, imagefs.inodesFree)")
        })
    };
    let mut out = Vec::new();
    for (name, value) in hard {
        let s = signal(name, "evictionHard")?;
        let a = amount(&format!("evictionHard {name}"), value)?;
        out.push(Threshold { signal: s, amount: a, grace: None });
        if s == Signal::MemoryAvailable {
            out.push(Threshold { signal: Signal::AllocatableMemoryAvailable, amount: a, grace: None });
        }
    }
    for name in soft_grace.keys() {
        if !soft.contains_key(name) {
            signal(name, "evictionSoftGracePeriod")?;
        }
    }
    for (name, value) in soft {
        let s = signal(name, "evictionSoft")?;
        let a = amount(&format!("evictionSoft {name}"), value)?;
        let grace = soft_grace
            .get(name)
            .ok_or_else(|| format!("evictionSoftGracePeriod: none for the soft threshold {name}"))?;
        let grace = crate::node::config::go_duration::parse(grace)
            .map_err(|e| format!("evictionSoftGracePeriod {name}: {e}"))?;
        out.push(Threshold { signal: s, amount: a, grace: Some(grace) });
    }
    Ok(out)
}

/// What a signal looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub available: u64,
    pub capacity: u64,
}

pub type Observations = HashMap<Signal, Observation>;

/// The thresholds met by `observed`, grace periods aside.
pub fn met<'a>(thresholds: &'a [Threshold], observed: &Observations) -> Vec<&'a Threshold> {
    thresholds
        .iter()
        .filter(|t| observed.get(&t.signal).is_some_and(|o| o.available < t.amount.of(o.capacity)))
        .collect()
}

/// What the manager remembers between rounds: when each threshold was first met (for soft
/// grace periods) and when each pressure was last seen (for the transition period).
#[derive(Debug, Default)]
pub struct State {
    first_met: HashMap<(Signal, bool), Instant>,
    last_pressure: HashMap<Pressure, Instant>,
}

/// One round's verdict on node pressure.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The conditions to report as true.
    pub memory_pressure: bool,
    pub disk_pressure: bool,
    /// The threshold to reclaim for now (met past its grace period), memory first.
    pub reclaim: Option<Threshold>,
}

impl State {
    /// Takes this round's observations at `now`.
    pub fn observe(
        &mut self,
        thresholds: &[Threshold],
        observed: &Observations,
        now: Instant,
        transition: Duration,
    ) -> Verdict {
        let met = met(thresholds, observed);
        self.first_met.retain(|k, _| met.iter().any(|t| (t.signal, t.hard()) == *k));
        for t in &met {
            self.first_met.entry((t.signal, t.hard())).or_insert(now);
            self.last_pressure.insert(t.signal.pressure(), now);
        }
        let holds = |p: Pressure| {
            self.last_pressure.get(&p).is_some_and(|at| {
                now.duration_since(*at) < transition.max(Duration::from_millis(1))
                    || met.iter().any(|t| t.signal.pressure() == p)
            })
        };
        let mut due: Vec<&Threshold> = met
            .iter()
            .filter(|t| {
                let since = self.first_met.get(&(t.signal, t.hard())).copied().unwrap_or(now);
                t.grace.is_none_or(|g| now.duration_since(since) >= g)
            })
            .copied()
            .collect();
        // Memory before disk, hard before soft.
        due.sort_by_key(|t| (t.signal.pressure() != Pressure::Memory, !t.hard()));
        Verdict {
            memory_pressure: holds(Pressure::Memory),
            disk_pressure: holds(Pressure::Disk),
            reclaim: due.first().map(|t| (*t).clone()),
        }
    }
}

/// One pod as the manager weighs it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub pod: Pod,
    /// Working set per running container, by name.
    pub memory: BTreeMap<String, u64>,
    /// Bytes of each of the pod's emptyDir volumes, by volume name.
    pub volumes: BTreeMap<String, u64>,
    /// Log bytes per container, by name.
    pub logs: BTreeMap<String, u64>,
    /// Everything else the pod keeps on the node's filesystem (its /etc files, termination
    /// logs), in bytes.
    pub other_disk: u64,
}

impl Candidate {
    fn memory_volume(&self, name: &str) -> bool {
        model::spec(&self.pod)
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == name && v.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory"))
    }

    /// The pod's working set: its containers', and its memory-backed emptyDirs (a tmpfs's
    /// pages are the pod's memory, as in the pod's cgroup).
    pub fn memory_usage(&self) -> u64 {
        let tmpfs: u64 = self.volumes.iter().filter(|(n, _)| self.memory_volume(n)).map(|(_, b)| b).sum();
        self.memory.values().sum::<u64>() + tmpfs
    }

    /// What the pod holds on the node's filesystem (memory-backed emptyDirs aside).
    pub fn disk_usage(&self) -> u64 {
        let volumes: u64 = self.volumes.iter().filter(|(n, _)| !self.memory_volume(n)).map(|(_, b)| b).sum();
        volumes + self.logs.values().sum::<u64>() + self.other_disk
    }
}

fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = model::spec(pod);
    spec.containers.iter().chain(spec.init_containers.iter().flatten())
}

fn quantity_of(c: &Container, which: &str, resource: &str) -> Option<Quantity> {
    let r = c.resources.as_ref()?;
    let m = if which == "limits" { r.limits.as_ref() } else { r.requests.as_ref() }?;
    Quantity::parse(&m.get(resource)?.0).ok()
}

fn request(c: &Container, resource: &str) -> u64 {
    quantity_of(c, "requests", resource).map_or(0, |q| q.ceil_units().max(0) as u64)
}

fn pod_request(pod: &Pod, resource: &str) -> u64 {
    model::spec(pod).containers.iter().map(|c| request(c, resource)).sum()
}

fn priority(pod: &Pod) -> i32 {
    model::spec(pod).priority.unwrap_or(0)
}

/// Pods that must not be evicted: static and mirror pods, and system-critical priorities
/// (the kubelet's IsCriticalPod).
pub fn critical(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    let source = annotations.and_then(|a| a.get("kubernetes.io/config.source")).map(String::as_str);
    let mirror = annotations.is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    matches!(source, Some(s) if s != "api") || mirror || priority(pod) >= 2_000_000_000
}

/// Orders candidates for eviction for `signal`, first to go first: pods using more than
/// they request, then lower priority, then the larger use above the request.
pub fn rank(candidates: &mut [Candidate], signal: Signal) {
    let memory = signal.pressure() == Pressure::Memory;
    let usage = |c: &Candidate| if memory { c.memory_usage() } else { c.disk_usage() };
    let req = |c: &Candidate| pod_request(&c.pod, if memory { "memory" } else { "ephemeral-storage" });
    candidates.sort_by_key(|c| {
        let (u, r) = (usage(c), req(c));
        (u <= r, priority(&c.pod), std::cmp::Reverse(u.saturating_sub(r)))
    });
}

/// A quantity of bytes as the API prints it (BinarySI: the largest exact binary suffix).
pub fn binary_si(n: u64) -> String {
    for (shift, suffix) in [(60, "Ei"), (50, "Pi"), (40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

fn threshold_text(t: &Threshold, capacity: u64) -> String {
    match t.amount {
        Amount::Quantity(q) => binary_si(q),
        Amount::Percent(_) => binary_si(t.amount.of(capacity)),
    }
}

/// The message of a pod evicted to reclaim for `t`.
pub fn pressure_message(t: &Threshold, observed: &Observations, c: &Candidate) -> String {
    let resource = t.signal.resource();
    let mut m = format!("The node was low on resource: {resource}. ");
    if let Some(o) = observed.get(&t.signal) {
        m += &format!("Threshold quantity: {}, available: {}. ", threshold_text(t, o.capacity), binary_si(o.available));
    }
    for container in &model::spec(&c.pod).containers {
        let usage = match resource {
            "memory" => c.memory.get(&container.name).copied(),
            "ephemeral-storage" => c.logs.get(&container.name).copied(),
            _ => None,
        };
        let requested = request(container, resource);
        if let Some(u) = usage.filter(|u| *u > requested) {
            m += &format!(
                "Container {} was using {}, request is {}, has larger consumption of {resource}. ",
                container.name,
                binary_si(u),
                binary_si(requested)
            );
        }
    }
    m
}

/// Why the pod must go for its own use of local storage, if it must: an emptyDir past its
/// sizeLimit, the pod past the sum of its containers' ephemeral-storage limits, or a
/// container's logs past its own limit.
pub fn local_storage_violation(c: &Candidate) -> Option<String> {
    let spec = model::spec(&c.pod);
    for v in spec.volumes.iter().flatten() {
        let Some(limit) = v.empty_dir.as_ref().and_then(|e| e.size_limit.as_ref()) else { continue };
        let Ok(q) = Quantity::parse(&limit.0) else { continue };
        let used = c.volumes.get(&v.name).copied().unwrap_or(0);
        if q.ceil_units() > 0 && i128::from(used) > q.ceil_units() {
            return Some(format!("Usage of EmptyDir volume {:?} exceeds the limit {:?}. ", v.name, limit.0));
        }
    }
    let limits: Vec<Quantity> =
        containers(&c.pod).filter_map(|k| quantity_of(k, "limits", "ephemeral-storage")).collect();
    if !limits.is_empty() {
        let total: i128 = limits.iter().map(|q| q.ceil_units()).sum();
        if i128::from(c.disk_usage()) > total {
            return Some(format!(
                "Pod ephemeral local storage usage exceeds the total limit of containers {}. ",
                binary_si(total.max(0) as u64)
            ));
        }
    }
    for k in &spec.containers {
        let Some(limit) = quantity_of(k, "limits", "ephemeral-storage").filter(|q| !q.is_zero()) else { continue };
        let used = c.logs.get(&k.name).copied().unwrap_or(0);
        if i128::from(used) > limit.ceil_units() {
            let text = k
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("ephemeral-storage"))
                .map(|q| q.0.clone())
                .unwrap_or_default();
            return Some(format!("Container {} exceeded its local ephemeral storage limit {text:?}. ", k.name));
        }
    }
    None
}

/// What the manager asks the pod manager to do with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub uid: String,
    /// Seconds the pod's containers get to stop.
    pub grace: i64,
    pub message: String,
    /// Evicted for node pressure: the pod gets the DisruptionTarget condition.
    pub pressure: bool,
}

/// One round: the pods to evict now (local-storage violations all at once; under pressure,
/// the first ranked pod that may be evicted), and the pressure conditions.
pub fn decide(
    config: &Config,
    state: &mut State,
    observed: &Observations,
    mut candidates: Vec<Candidate>,
    now: Instant,
) -> (Verdict, Vec<Eviction>) {
    let verdict = state.observe(&config.thresholds, observed, now, config.transition);
    let uid = |c: &Candidate| c.pod.metadata.uid.clone().unwrap_or_default();
    let mut out: Vec<Eviction> = candidates
        .iter()
        .filter(|c| !critical(&c.pod))
        .filter_map(|c| {
            local_storage_violation(c).map(|message| Eviction { uid: uid(c), grace: 0, message, pressure: false })
        })
        .collect();
    if !out.is_empty() {
        return (verdict, out);
    }
    if let Some(t) = &verdict.reclaim {
        rank(&mut candidates, t.signal);
        if let Some(c) = candidates.iter().find(|c| !critical(&c.pod)) {
            let grace = if t.hard() {
                0
            } else {
                let own = model::spec(&c.pod).termination_grace_period_seconds.unwrap_or(30);
                own.min(config.max_pod_grace.max(0))
            };
            out.push(Eviction { uid: uid(c), grace, message: pressure_message(t, observed, c), pressure: true });
        }
    }
    (verdict, out)
}

/// The pressure conditions the node reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePressure {
    pub memory: bool,
    pub disk: bool,
}

/// Admission under pressure, as the eviction manager admits: critical pods always; under
/// memory pressure alone, pods that are not BestEffort (or that tolerate the memory-pressure
/// taint); under any other pressure, none.
pub fn admit(pod: &Pod, pressure: NodePressure) -> Result<(), crate::admission::Refusal> {
    if !(pressure.memory || pressure.disk) || critical(pod) {
        return Ok(());
    }
    if pressure.memory && !pressure.disk {
        let best_effort = crate::status::qos_class(model::spec(pod)) == "BestEffort";
        let tolerates = crate::admission::tolerates(pod, "node.kubernetes.io/memory-pressure", "", "NoSchedule");
        if !best_effort || tolerates {
            return Ok(());
        }
    }
    let names: Vec<&str> = [(pressure.memory, "MemoryPressure"), (pressure.disk, "DiskPressure")]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
    Err(crate::admission::Refusal {
        reason: REASON.into(),
        message: format!("The node had condition: [{}]. ", names.join(" ")),
    })
}

/// Where the manager looks, and what it may use.
pub struct Node {
    pub pods: Arc<crate::worker::Node>,
    /// The image store's directory (imagefs).
    pub image_root: PathBuf,
    /// What pods may use of the node's memory (its allocatable), in bytes.
    pub allocatable_memory: u64,
}

/// A filesystem's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsStats {
    pub available: u64,
    pub capacity: u64,
    pub inodes_free: u64,
    pub inodes: u64,
}

/// What a pod holds on the node's disks (and tmpfs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodStorage {
    /// Each emptyDir's bytes, and whether it is memory-backed.
    pub volumes: BTreeMap<String, (u64, bool)>,
    /// Log bytes per container, by name.
    pub logs: BTreeMap<String, u64>,
    /// Its ephemeral storage: all it holds on the node's filesystem.
    pub disk: u64,
}

/// What the last round found on the node's disks, kept for the node API's summary as the
/// kubelet keeps its filesystem stats between its housekeeping rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Storage {
    /// When it was read: nanoseconds since the epoch.
    pub at: i64,
    pub node_fs: Option<FsStats>,
    pub image_fs: Option<FsStats>,
    /// By pod UID.
    pub pods: HashMap<String, PodStorage>,
}

impl Storage {
    fn of(observed: &Observations, candidates: &[Candidate], at: i64) -> Storage {
        let fs = |bytes, inodes| {
            let (b, i): (&Observation, &Observation) = (observed.get(&bytes)?, observed.get(&inodes)?);
            Some(FsStats { available: b.available, capacity: b.capacity, inodes_free: i.available, inodes: i.capacity })
        };
        let pods = candidates
            .iter()
            .map(|c| {
                let volumes = c.volumes.iter().map(|(n, b)| (n.clone(), (*b, c.memory_volume(n)))).collect();
                let uid = c.pod.metadata.uid.clone().unwrap_or_default();
                (uid, PodStorage { volumes, logs: c.logs.clone(), disk: c.disk_usage() })
            })
            .collect();
        Storage {
            at,
            node_fs: fs(Signal::NodeFsAvailable, Signal::NodeFsInodesFree),
            image_fs: fs(Signal::ImageFsAvailable, Signal::ImageFsInodesFree),
            pods,
        }
    }
}

/// Runs the eviction manager every [`PERIOD`] until the pod manager goes: asks it for the
/// running pods, observes, publishes the node's pressure and what it found on disk, and hands
/// the pod manager the evictions.
pub async fn run(
    config: Config,
    node: Node,
    manager: mpsc::UnboundedSender<PodUpdate>,
    pressure: watch::Sender<NodePressure>,
    storage: watch::Sender<Arc<Storage>>,
    images: Option<Arc<crate::imagegc::ImageGc>>,
) {
    let node = Arc::new(node);
    let mut state = State::default();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (reply, pods) = oneshot::channel();
        if manager.send(PodUpdate::Running(reply)).is_err() {
            return;
        }
        let Ok(pods) = pods.await else { return };
        let stats = match node.pods.cri.container_stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "eviction manager: the containers' stats");
                continue;
            }
        };
        let n = node.clone();
        let Ok((observed, candidates)) = tokio::task::spawn_blocking(move || observe(&n, pods, &stats)).await else {
            continue;
        };
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        storage.send_replace(Arc::new(Storage::of(&observed, &candidates, at)));
        let (verdict, evictions) = decide(&config, &mut state, &observed, candidates, Instant::now());
        let now = NodePressure { memory: verdict.memory_pressure, disk: verdict.disk_pressure };
        pressure.send_if_modified(|p| {
            let changed = *p != now;
            if changed {
                tracing::info!(memory = now.memory, disk = now.disk, "node pressure changed");
            }
            *p = now;
            changed
        });
        let mut evictions = evictions;
        if let Some(t) = &verdict.reclaim {
            let disk = !matches!(t.signal, Signal::MemoryAvailable | Signal::AllocatableMemoryAvailable);
            // Node-level resources first, as the kubelet reclaims them: for disk, every unused
            // image. Pods go only if the threshold still holds at the next round.
            let freed = match (&images, disk) {
                (Some(gc), true) => gc.delete_unused().await,
                _ => 0,
            };
            if freed > 0 {
                tracing::info!(signal = t.signal.name(), freed, "eviction manager: unused images removed to reclaim");
                evictions.retain(|e| !e.pressure);
            } else {
                tracing::info!(signal = t.signal.name(), "eviction manager: threshold met, evicting to reclaim");
            }
        }
        for e in evictions {
            if manager.send(PodUpdate::Evict(e)).is_err() {
                return;
            }
        }
    }
}

/// The node's signals and each running pod's use, read from the CRI's stats and the files.
fn observe(node: &Node, pods: Vec<Pod>, stats: &[cri::ContainerStats]) -> (Observations, Vec<Candidate>) {
    let mut memory: HashMap<&str, BTreeMap<String, u64>> = HashMap::new();
    for s in stats {
        let Some(a) = &s.attributes else { continue };
        let (Some(uid), Some(name)) = (a.labels.get(crate::cri::POD_UID), a.labels.get(crate::cri::CONTAINER_NAME))
        else {
            continue;
        };
        let ws = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
        *memory.entry(uid.as_str()).or_default().entry(name.clone()).or_default() += ws;
    }
    let w = &node.pods;
    let candidates: Vec<Candidate> = pods
        .into_iter()
        .map(|pod| {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let pod_dir = w.pod_dir(&uid);
            let mut volumes = BTreeMap::new();
            for v in model::spec(&pod).volumes.iter().flatten().filter(|v| v.empty_dir.is_some()) {
                let memory = v.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory");
                let dir = if memory {
                    w.memory_dir(&uid).join(&v.name)
                } else {
                    crate::volumes::volume_dir(&pod_dir, "empty-dir", &v.name)
                };
                volumes.insert(v.name.clone(), du(&dir));
            }
            let logs_dir = w.logs_dir(&pod);
            let logs =
                model::spec(&pod).containers.iter().map(|c| (c.name.clone(), du(&logs_dir.join(&c.name)))).collect();
            // The emptyDirs were counted above: not walked twice.
            let other_disk = du_except(&pod_dir, &pod_dir.join("volumes").join("kubernetes.io~empty-dir"));
            Candidate { memory: memory.remove(uid.as_str()).unwrap_or_default(), pod, volumes, logs, other_disk }
        })
        .collect();
    let mut observed = Observations::new();
    if let Some(m) = self::memory() {
        observed.insert(Signal::MemoryAvailable, m);
    }
    let used: u64 = candidates.iter().map(Candidate::memory_usage).sum();
    observed.insert(
        Signal::AllocatableMemoryAvailable,
        Observation { available: node.allocatable_memory.saturating_sub(used), capacity: node.allocatable_memory },
    );
    if let Some((bytes, inodes)) = filesystem(&w.root) {
        observed.insert(Signal::NodeFsAvailable, bytes);
        observed.insert(Signal::NodeFsInodesFree, inodes);
    }
    if let Some((bytes, inodes)) = filesystem(&node.image_root) {
        observed.insert(Signal::ImageFsAvailable, bytes);
        observed.insert(Signal::ImageFsInodesFree, inodes);
    }
    (observed, candidates)
}

// ---- the readers: what the node looks like now ----

/// Bytes and inodes of the filesystem holding `path`.
pub fn filesystem(path: &Path) -> Option<(Observation, Observation)> {
    let s = rustix::fs::statvfs(path).ok()?;
    let bytes = Observation { available: s.f_bavail * s.f_frsize, capacity: s.f_blocks * s.f_frsize };
    let inodes = Observation { available: s.f_favail, capacity: s.f_files };
    Some((bytes, inodes))
}

/// MemAvailable and MemTotal from /proc/meminfo.
pub fn memory() -> Option<Observation> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let bytes = |key| crate::node::stats::meminfo_bytes(&text, key);
    Some(Observation { available: bytes("MemAvailable")?, capacity: bytes("MemTotal")? })
}

/// The bytes of the files under `dir` (apparent sizes; a directory that is gone holds none;
/// links are not followed).
pub fn du(dir: &Path) -> u64 {
    du_except(dir, Path::new(""))
}

/// [`du`] of `dir` without what is under `skip`.
fn du_except(dir: &Path, skip: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() && e.path() != skip {
                stack.push(e.path());
            } else if t.is_file() {
                total += e.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity as Q;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(uid: &str, containers: serde_json::Value, extra: serde_json::Value) -> Pod {
        let mut spec = serde_json::json!({ "containers": containers });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": uid, "namespace": "default", "uid": uid,
                          "annotations": { "kubernetes.io/config.source": "api" } },
            "spec": spec,
        }))
        .unwrap()
    }

    fn candidate(p: Pod, memory: &[(&str, u64)]) -> Candidate {
        Candidate {
            pod: p,
            memory: memory.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            volumes: BTreeMap::new(),
            logs: BTreeMap::new(),
            other_disk: 0,
        }
    }

    #[test]
    fn thresholds_parse_as_the_kubelets_flags() {
        let t = parse(&default_hard(), &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert_eq!(t.len(), 6, "five defaults and the allocatable guard: {t:?}");
        assert!(t.contains(&Threshold {
            signal: Signal::MemoryAvailable,
            amount: Amount::Quantity(100 << 20),
            grace: None
        }));
        assert!(t.contains(&Threshold { signal: Signal::NodeFsAvailable, amount: Amount::Percent(10.0), grace: None }));
        let soft =
            parse(&BTreeMap::new(), &map(&[("memory.available", "1Gi")]), &map(&[("memory.available", "1m30s")]))
                .unwrap();
        assert_eq!(soft[0].grace, Some(Duration::from_secs(90)));
        let e = parse(&BTreeMap::new(), &map(&[("memory.available", "1Gi")]), &BTreeMap::new()).unwrap_err();
        assert_eq!(e, "evictionSoftGracePeriod: none for the soft threshold memory.available");
        let e = parse(&map(&[("memory.free", "1Gi")]), &BTreeMap::new(), &BTreeMap::new()).unwrap_err();
        assert!(e.starts_with("evictionHard: unknown signal \"memory.free\""), "{e}");
        let e = parse(&map(&[("nodefs.available", "110%")]), &BTreeMap::new(), &BTreeMap::new()).unwrap_err();
        assert!(e.contains("between 0% and 100%"), "{e}");
        let e = parse(&map(&[("nodefs.available", "lots")]), &BTreeMap::new(), &BTreeMap::new()).unwrap_err();
        assert!(e.starts_with("evictionHard nodefs.available: quantity \"lots\""), "{e}");
    }

    #[test]
    fn soft_thresholds_wait_their_grace_and_pressure_outlives_the_threshold() {
        let t = vec![
            Threshold {
                signal: Signal::MemoryAvailable,
                amount: Amount::Quantity(100),
                grace: Some(Duration::from_secs(30)),
            },
            Threshold { signal: Signal::NodeFsAvailable, amount: Amount::Percent(10.0), grace: None },
        ];
        let low = Observations::from([(Signal::MemoryAvailable, Observation { available: 50, capacity: 1000 })]);
        let fine = Observations::from([(Signal::MemoryAvailable, Observation { available: 500, capacity: 1000 })]);
        let mut s = State::default();
        let t0 = Instant::now();
        let transition = Duration::from_secs(60);
        let v = s.observe(&t, &low, t0, transition);
        assert!(v.memory_pressure && !v.disk_pressure);
        assert_eq!(v.reclaim, None, "a soft threshold waits for its grace period");
        let v = s.observe(&t, &low, t0 + Duration::from_secs(30), transition);
        assert_eq!(v.reclaim.map(|t| t.signal), Some(Signal::MemoryAvailable));
        let v = s.observe(&t, &fine, t0 + Duration::from_secs(40), transition);
        assert!(v.memory_pressure && v.reclaim.is_none(), "the condition stays for the transition period");
        let v = s.observe(&t, &fine, t0 + Duration::from_secs(91), transition);
        assert!(!v.memory_pressure);
        // Met again: the grace period starts over.
        let v = s.observe(&t, &low, t0 + Duration::from_secs(92), transition);
        assert!(v.memory_pressure && v.reclaim.is_none());
        // 5% of 1000 free: the disk threshold (10%) is met and acts at once.
        let disk = Observations::from([(Signal::NodeFsAvailable, Observation { available: 50, capacity: 1000 })]);
        let v = s.observe(&t, &disk, t0 + Duration::from_secs(93), transition);
        assert!(v.disk_pressure);
        assert_eq!(v.reclaim.map(|t| t.signal), Some(Signal::NodeFsAvailable));
    }

    #[test]
    fn memory_pressure_evicts_the_pod_furthest_above_its_requests_first() {
        let burstable = pod(
            "burstable",
            serde_json::json!([{ "name": "c", "resources": { "requests": { "memory": "100Mi" } } }]),
            serde_json::json!({}),
        );
        let best_effort = pod("best-effort", serde_json::json!([{ "name": "c" }]), serde_json::json!({}));
        let guaranteed = pod(
            "guaranteed",
            serde_json::json!([{ "name": "c", "resources": { "requests": { "memory": "1Gi" }, "limits": { "memory": "1Gi" } } }]),
            serde_json::json!({}),
        );
        let important = pod("important", serde_json::json!([{ "name": "c" }]), serde_json::json!({ "priority": 1000 }));
        let mut c = vec![
            candidate(guaranteed, &[("c", 900 << 20)]),
            candidate(important, &[("c", 500 << 20)]),
            candidate(burstable, &[("c", 150 << 20)]),
            candidate(best_effort, &[("c", 10 << 20)]),
        ];
        rank(&mut c, Signal::MemoryAvailable);
        let order: Vec<&str> = c.iter().map(|c| c.pod.metadata.uid.as_deref().unwrap()).collect();
        // Above their requests: best-effort and burstable (priority 0) before important
        // (priority 1000); burstable is 50Mi over, best-effort 10Mi. Within its request last.
        assert_eq!(order, ["burstable", "best-effort", "important", "guaranteed"]);

        let config = Config {
            thresholds: vec![Threshold {
                signal: Signal::MemoryAvailable,
                amount: Amount::Quantity(100 << 20),
                grace: None,
            }],
            max_pod_grace: 0,
            transition: Duration::from_secs(300),
        };
        let observed =
            Observations::from([(Signal::MemoryAvailable, Observation { available: 50 << 20, capacity: 1 << 30 })]);
        let (v, out) = decide(&config, &mut State::default(), &observed, c, Instant::now());
        assert!(v.memory_pressure);
        assert_eq!(out.len(), 1, "one pod per round");
        assert_eq!(out[0].uid, "burstable");
        assert_eq!(out[0].grace, 0);
        assert!(out[0].pressure);
        assert_eq!(
            out[0].message,
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. Container c was using 150Mi, request is 100Mi, has larger consumption of memory. "
        );
    }

    #[test]
    fn static_mirror_and_critical_pods_are_not_evicted() {
        let mut s = pod("static", serde_json::json!([{ "name": "c" }]), serde_json::json!({}));
        s.metadata.annotations = Some(map(&[("kubernetes.io/config.source", "file")]));
        assert!(critical(&s));
        let mut m = pod("mirror", serde_json::json!([{ "name": "c" }]), serde_json::json!({}));
        m.metadata.annotations.as_mut().unwrap().insert("kubernetes.io/config.mirror".into(), "x".into());
        assert!(critical(&m));
        let c = pod("system", serde_json::json!([{ "name": "c" }]), serde_json::json!({ "priority": 2_000_001_000 }));
        assert!(critical(&c));
        assert!(!critical(&pod("p", serde_json::json!([{ "name": "c" }]), serde_json::json!({}))));
    }

    #[test]
    fn local_storage_limits() {
        let p = pod(
            "p",
            serde_json::json!([{ "name": "c", "resources": { "limits": { "ephemeral-storage": "10Mi" } } }]),
            serde_json::json!({ "volumes": [{ "name": "scratch", "emptyDir": { "sizeLimit": "1Mi" } }, { "name": "ram", "emptyDir": { "medium": "Memory" } }] }),
        );
        let mut c = candidate(p, &[]);
        c.volumes.insert("scratch".into(), 1 << 20);
        assert_eq!(local_storage_violation(&c), None, "at the limit is within it");
        c.volumes.insert("scratch".into(), (1 << 20) + 1);
        assert_eq!(
            local_storage_violation(&c).as_deref(),
            Some("Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\". ")
        );
        c.volumes.insert("scratch".into(), 0);
        c.volumes.insert("ram".into(), 100 << 20);
        assert_eq!(local_storage_violation(&c), None, "a memory emptyDir is not local storage");
        c.other_disk = 11 << 20;
        assert_eq!(
            local_storage_violation(&c).as_deref(),
            Some("Pod ephemeral local storage usage exceeds the total limit of containers 10Mi. ")
        );
        let mut q = c.clone();
        q.pod.spec.as_mut().unwrap().containers[0].resources.as_mut().unwrap().limits =
            Some([("ephemeral-storage".to_string(), Q("5Mi".into()))].into());
        q.other_disk = 0;
        q.logs.insert("c".into(), 6 << 20);
        assert_eq!(
            local_storage_violation(&q).as_deref(),
            Some("Pod ephemeral local storage usage exceeds the total limit of containers 5Mi. ")
        );
    }

    #[test]
    fn pressure_refuses_best_effort_pods_or_every_pod() {
        let best_effort = pod("be", serde_json::json!([{ "name": "c" }]), serde_json::json!({}));
        let burstable = pod(
            "b",
            serde_json::json!([{ "name": "c", "resources": { "requests": { "memory": "1Mi" } } }]),
            serde_json::json!({}),
        );
        let memory = NodePressure { memory: true, disk: false };
        let disk = NodePressure { memory: false, disk: true };
        assert!(admit(&best_effort, NodePressure::default()).is_ok());
        let e = admit(&best_effort, memory).unwrap_err();
        assert_eq!((e.reason.as_str(), e.message.as_str()), ("Evicted", "The node had condition: [MemoryPressure]. "));
        assert!(admit(&burstable, memory).is_ok());
        let e = admit(&burstable, disk).unwrap_err();
        assert_eq!(e.message, "The node had condition: [DiskPressure]. ");
        let e = admit(&burstable, NodePressure { memory: true, disk: true }).unwrap_err();
        assert_eq!(e.message, "The node had condition: [MemoryPressure DiskPressure]. ");
        let mut tolerant = best_effort.clone();
        tolerant.spec.as_mut().unwrap().tolerations = Some(vec![k8s_openapi::api::core::v1::Toleration {
            key: Some("node.kubernetes.io/memory-pressure".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert!(admit(&tolerant, memory).is_ok());
    }

    #[test]
    fn quantities_print_as_the_api_prints_them() {
        assert_eq!(binary_si(100 << 20), "100Mi");
        assert_eq!(binary_si(1536), "1536");
        assert_eq!(binary_si(3 << 10), "3Ki");
        assert_eq!(binary_si(0), "0");
        assert_eq!(binary_si(1 << 30), "1Gi");
    }

    #[test]
    fn du_counts_files_below() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), [0u8; 1000]).unwrap();
        std::fs::write(d.path().join("g"), [0u8; 24]).unwrap();
        assert_eq!(du(d.path()), 1024);
        assert_eq!(du(&d.path().join("missing")), 0);
        assert_eq!(du_except(d.path(), &d.path().join("a")), 24);
    }
}
