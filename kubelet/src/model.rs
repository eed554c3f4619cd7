//! What the pod worker observes through the CRI, in the kubelet's terms, and the probe results
//! it keeps: the inputs of the pure status and action functions.

use std::collections::HashMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

use super::probe::{ProbeKind, Published};

/// A container instance's runtime state (CRI ContainerState).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Exited,
    Unknown,
}

/// One container instance as the runtime reports it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub name: String,
    /// The kubelet's restart count for this instance (`attempt`).
    pub restart_count: i32,
    pub state: State,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub exit_code: i32,
    pub reason: String,
    /// The runtime's message, or the termination message once read.
    pub message: String,
    pub image: String,
    pub image_ref: String,
    /// The spec hash the instance was created from.
    pub hash: String,
}

impl Instance {
    pub fn exited(&self) -> bool {
        self.state == State::Exited
    }
}

/// The sandbox as observed.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub ready: bool,
    pub ip: String,
    pub attempt: u32,
}

/// Everything observed of one pod.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub sandbox: Option<Sandbox>,
    /// All instances, any order.
    pub instances: Vec<Instance>,
}

impl Observed {
    fn of(&self, name: &str) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(move |i| i.name == name)
    }

    /// The newest instance of a container.
    pub fn latest(&self, name: &str) -> Option<&Instance> {
        self.of(name).max_by_key(|i| (i.created_at, i.restart_count))
    }

    /// The instance before the newest one.
    pub fn previous(&self, name: &str) -> Option<&Instance> {
        let latest = self.latest(name)?;
        self.of(name).filter(|i| i.id != latest.id).max_by_key(|i| (i.created_at, i.restart_count))
    }
}

/// Exited instances older than the newest `keep` of their container (what container GC
/// removes).
pub fn dead_beyond(observed: &Observed, keep: usize) -> Vec<&Instance> {
    let mut by_name: HashMap<&str, Vec<&Instance>> = HashMap::new();
    for i in &observed.instances {
        by_name.entry(i.name.as_str()).or_default().push(i);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_name {
        list.sort_by_key(|i| std::cmp::Reverse((i.created_at, i.restart_count)));
        out.extend(list.into_iter().skip(keep).filter(|i| i.exited()));
    }
    out
}

/// A start failure remembered for the status (the kubelet's reason cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError {
    pub reason: String,
    pub message: String,
}

/// The published probe results, by (container name, probe kind), with the container ID each
/// applies to.
#[derive(Debug, Clone, Default)]
pub struct ProbeResults {
    map: HashMap<(String, ProbeKind), (Option<String>, Published)>,
}

impl ProbeResults {
    /// Declares a probe worker (a container with this probe).
    pub fn declare(&mut self, name: &str, kind: ProbeKind) {
        self.map.entry((name.to_string(), kind)).or_insert((None, super::probe::Worker::initial(kind)));
    }

    pub fn set(&mut self, name: &str, kind: ProbeKind, id: Option<&str>, r: Published) {
        self.map.insert((name.to_string(), kind), (id.map(str::to_string), r));
    }

    pub fn has(&self, name: &str, kind: ProbeKind) -> bool {
        self.map.contains_key(&(name.to_string(), kind))
    }

    /// The result for the container's instance `id`, if a worker published one for it.
    pub fn get(&self, name: &str, kind: ProbeKind, id: &str) -> Option<Published> {
        match self.map.get(&(name.to_string(), kind)) {
            Some((Some(for_id), r)) if for_id == id => Some(*r),
            _ => None,
        }
    }

    pub fn remove_container(&mut self, name: &str) {
        self.map.retain(|(n, _), _| n != name);
    }

    /// The kubelet's `started`: running, and the startup probe passed (or there is none).
    pub fn started(&self, name: &str, inst: &Instance) -> bool {
        if inst.state != State::Running {
            return false;
        }
        match self.get(name, ProbeKind::Startup, &inst.id) {
            Some(r) => r == Published::Success,
            None => !self.has(name, ProbeKind::Startup),
        }
    }

    /// The kubelet's `ready` for a running, started container: readiness Success, or no
    /// readiness probe.
    pub fn ready(&self, name: &str, inst: &Instance) -> bool {
        if !self.started(name, inst) {
            return false;
        }
        match self.get(name, ProbeKind::Readiness, &inst.id) {
            Some(r) => r == Published::Success,
            None => !self.has(name, ProbeKind::Readiness),
        }
    }
}

/// A sidecar: an init container with restartPolicy Always.
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The pod's restartPolicy, defaulted to Always.
pub fn restart_policy(spec: &PodSpec) -> &str {
    spec.restart_policy.as_deref().unwrap_or("Always")
}

pub fn spec(pod: &Pod) -> &PodSpec {
    static EMPTY: std::sync::OnceLock<PodSpec> = std::sync::OnceLock::new();
    pod.spec.as_ref().unwrap_or_else(|| EMPTY.get_or_init(PodSpec::default))
}

/// The pod's UID ("" when it has none).
pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// `namespace/name`.
pub fn full_name(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!("{}/{}", m.namespace.as_deref().unwrap_or("default"), m.name.as_deref().unwrap_or_default())
}

/// Whether the pod's status shows a terminal phase (Succeeded or Failed).
pub fn finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// `name_namespace_uid`, the prefix of the pod's back-off keys.
pub fn pod_key(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!(
        "{}_{}_{}",
        m.name.as_deref().unwrap_or_default(),
        m.namespace.as_deref().unwrap_or("default"),
        m.uid.as_deref().unwrap_or_default()
    )
}

/// The spec hash of a container: any change to it restarts the container.
pub fn container_hash(c: &Container) -> String {
    // FNV-1a over the JSON form: stable across builds, so a restart of wasmlet agrees with the
    // hashes it wrote before.
    let json = serde_json::to_vec(c).unwrap_or_default();
    let h = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("{:08x}", h as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn container_gc_keeps_the_newest_two_of_each_container() {
        let (a, b) = (container("a"), container("b"));
        let obs = observed(vec![
            inst(&a, 0, State::Exited, 1, 0),
            inst(&a, 1, State::Exited, 1, 10),
            inst(&a, 2, State::Exited, 1, 20),
            inst(&a, 3, State::Running, 0, 30),
            inst(&b, 0, State::Exited, 0, 0),
            inst(&b, 1, State::Running, 0, 5),
        ]);
        let mut gone: Vec<&str> = dead_beyond(&obs, 2).iter().map(|i| i.id.as_str()).collect();
        gone.sort();
        assert_eq!(gone, ["a-0", "a-1"]);
        assert_eq!(obs.latest("a").unwrap().id, "a-3");
        assert_eq!(obs.previous("a").unwrap().id, "a-2");
    }
}
