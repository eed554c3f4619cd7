//! The Node object as the kubelet registers it and its status as the kubelet reports it
//! (`kubelet_node_status.go`, `pkg/kubelet/nodestatus`): pure functions of what the node
//! knows about itself ([`Facts`]) and the previous status.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::{NodeConfig, WASM_LABEL};
use crate::status::time;

/// What the node knows about itself when it computes its status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub name: String,
    pub hostname: String,
    pub internal_ip: String,
    pub cpus: u64,
    pub memory_bytes: u64,
    /// The size of the filesystem holding the root directory.
    pub ephemeral_storage_bytes: u64,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
    /// wasmlet's own version.
    pub version: String,
    /// The runtime's readiness (CRI Status): None when it answered RuntimeReady and
    /// NetworkReady, else why not, worded as the kubelet words it.
    pub runtime_problem: Option<String>,
    /// The eviction manager's MemoryPressure and DiskPressure.
    pub pressure: crate::eviction::NodePressure,
}

/// The Kubernetes version wasmlet's node behaviour follows, reported as kubeletVersion.
pub const KUBELET_VERSION: &str = "v1.33.0";

/// The architecture as Go names it (`GOARCH`).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "arm" => "arm",
        other => other,
    }
}

/// The labels the kubelet sets on its Node (plus wasmlet's own and the configured ones).
pub fn labels(cfg: &NodeConfig, f: &Facts) -> BTreeMap<String, String> {
    let mut l: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", f.hostname.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", go_arch()),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", go_arch()),
        (WASM_LABEL, "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    l.extend(cfg.node_labels.clone());
    l
}

/// The Node to create at registration: labels, taints, and a first status.
pub fn node_object(cfg: &NodeConfig, f: &Facts, now: SystemTime) -> Node {
    let taints: Vec<Taint> = cfg
        .register_with_taints
        .iter()
        .map(|t| Taint {
            key: t.key.clone(),
            value: (!t.value.is_empty()).then(|| t.value.clone()),
            effect: t.effect.clone(),
            time_added: None,
        })
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(f.name.clone()),
            labels: Some(labels(cfg, f)),
            annotations: Some([("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string())].into_iter().collect()),
            ..Default::default()
        },
        spec: Some(NodeSpec { taints: (!taints.is_empty()).then_some(taints), ..Default::default() }),
        status: Some(status(cfg, f, None, now)),
    }
}

fn quantity(s: impl Into<String>) -> Quantity {
    Quantity(s.into())
}

/// The memory pods may use: the machine's, less systemReserved, kubeReserved and the hard
/// memory.available threshold.
pub fn allocatable_memory(cfg: &NodeConfig, f: &Facts) -> u64 {
    f.memory_bytes.saturating_sub(cfg.reserved_memory())
}

/// The resources of the node and what pods may use of them.
pub fn resources(cfg: &NodeConfig, f: &Facts) -> (BTreeMap<String, Quantity>, BTreeMap<String, Quantity>) {
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu", quantity(f.cpus.to_string())),
        ("memory", quantity(format!("{}Ki", f.memory_bytes / 1024))),
        ("pods", quantity(cfg.max_pods.to_string())),
        ("ephemeral-storage", quantity(format!("{}Ki", f.ephemeral_storage_bytes / 1024))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let storage = f.ephemeral_storage_bytes - f.ephemeral_storage_bytes / 10;
    let allocatable: BTreeMap<String, Quantity> = [
        ("cpu", quantity(f.cpus.to_string())),
        ("memory", quantity(format!("{}Ki", allocatable_memory(cfg, f) / 1024))),
        ("pods", quantity(cfg.max_pods.to_string())),
        ("ephemeral-storage", quantity(storage.to_string())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (capacity, allocatable)
}

/// One condition: its type, whether it holds, reason and message.
fn condition(kind: &str, holds: bool, reason: &str, message: &str) -> NodeCondition {
    NodeCondition {
        type_: kind.into(),
        status: if holds { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    }
}

/// The four conditions the kubelet reports, in its order.
pub fn conditions(f: &Facts) -> Vec<NodeCondition> {
    let ready = match &f.runtime_problem {
        None => condition("Ready", true, "KubeletReady", "kubelet is posting ready status"),
        Some(why) => condition("Ready", false, "KubeletNotReady", why),
    };
    let memory = match f.pressure.memory {
        false => {
            condition("MemoryPressure", false, "KubeletHasSufficientMemory", "kubelet has sufficient memory available")
        }
        true => condition(
            "MemoryPressure",
            true,
            "KubeletHasInsufficientMemory",
            "kubelet has insufficient memory available",
        ),
    };
    let disk = match f.pressure.disk {
        false => condition("DiskPressure", false, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        true => condition("DiskPressure", true, "KubeletHasDiskPressure", "kubelet has disk pressure"),
    };
    vec![
        memory,
        disk,
        condition("PIDPressure", false, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ready,
    ]
}

/// The node status now. Conditions keep their lastTransitionTime from `old` while their
/// status stays the same; the heartbeat time is now.
pub fn status(cfg: &NodeConfig, f: &Facts, old: Option<&NodeStatus>, now: SystemTime) -> NodeStatus {
    let (capacity, allocatable) = resources(cfg, f);
    let now_t = time(now);
    let conditions = conditions(f)
        .into_iter()
        .map(|mut c| {
            let before = old.and_then(|o| o.conditions.as_ref()).and_then(|cs| cs.iter().find(|o| o.type_ == c.type_));
            c.last_heartbeat_time = Some(now_t.clone());
            c.last_transition_time = match before {
                Some(b) if b.status == c.status => b.last_transition_time.clone().or(Some(now_t.clone())),
                _ => Some(now_t.clone()),
            };
            c
        })
        .collect();
    NodeStatus {
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        conditions: Some(conditions),
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: f.internal_ip.clone() },
            NodeAddress { type_: "Hostname".into(), address: f.hostname.clone() },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(cfg.port) }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch().into(),
            boot_id: f.boot_id.clone(),
            container_runtime_version: format!("wasmlet://{}", f.version),
            kernel_version: f.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: f.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: f.os_image.clone(),
            system_uuid: f.system_uuid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether two statuses differ in more than their heartbeat times (the kubelet posts a
/// status when it changed, and otherwise only every nodeStatusReportFrequency).
pub fn changed(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        // Fields that other components own.
        s.images = None;
        s.volumes_attached = None;
        s.volumes_in_use = None;
        s.config = None;
        s.runtime_handlers = None;
        s.features = None;
        s.capacity = None;
        s.allocatable = None;
        s
    };
    // Quantities as numbers: the API server writes them in its canonical form ("4Gi").
    let amounts = |m: &Option<BTreeMap<String, Quantity>>| -> BTreeMap<String, Option<crate::quantity::Quantity>> {
        m.iter().flatten().map(|(k, v)| (k.clone(), crate::quantity::Quantity::parse(&v.0).ok())).collect()
    };
    strip(a) != strip(b)
        || amounts(&a.capacity) != amounts(&b.capacity)
        || amounts(&a.allocatable) != amounts(&b.allocatable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn facts() -> Facts {
        Facts {
            name: "edge-1".into(),
            hostname: "edge-1".into(),
            internal_ip: "127.0.0.1".into(),
            cpus: 2,
            memory_bytes: 4 << 30,
            ephemeral_storage_bytes: 100 << 30,
            version: "0.1.0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn registration_carries_labels_taint_and_resources() {
        let mut cfg = NodeConfig::default();
        cfg.node_labels.insert("zone".into(), "edge".into());
        let n = node_object(&cfg, &facts(), SystemTime::UNIX_EPOCH);
        let l = n.metadata.labels.unwrap();
        assert_eq!(l["kubernetes.io/hostname"], "edge-1");
        assert_eq!(l["kubernetes.io/os"], "linux");
        assert_eq!(l["kubernetes.io/arch"], go_arch());
        assert_eq!(l[WASM_LABEL], "true");
        assert_eq!(l["zone"], "edge");
        let t = &n.spec.unwrap().taints.unwrap()[0];
        assert_eq!((t.key.as_str(), t.value.as_deref(), t.effect.as_str()), (WASM_LABEL, Some("true"), "NoSchedule"));
        let s = n.status.unwrap();
        let cap = s.capacity.unwrap();
        let alloc = s.allocatable.unwrap();
        assert_eq!(cap["cpu"].0, "2");
        assert_eq!(cap["memory"].0, "4194304Ki");
        assert_eq!(alloc["memory"].0, format!("{}Ki", (4u64 << 20) - 100 * 1024));
        assert_eq!(cap["pods"].0, "110");
        assert_eq!(alloc["ephemeral-storage"].0, ((100u64 << 30) - (100u64 << 30) / 10).to_string());
        let info = s.node_info.unwrap();
        assert_eq!(info.container_runtime_version, "wasmlet://0.1.0");
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert_eq!(s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port, 10250);
        let types: Vec<String> = s.addresses.unwrap().into_iter().map(|a| a.type_).collect();
        assert_eq!(types, ["InternalIP", "Hostname"]);
        let no_taints = NodeConfig { register_with_taints: vec![], ..NodeConfig::default() };
        assert!(node_object(&no_taints, &facts(), SystemTime::UNIX_EPOCH).spec.unwrap().taints.is_none());
    }

    #[test]
    fn ready_follows_the_runtime_and_transitions_keep_their_time() {
        let cfg = NodeConfig::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let s0 = status(&cfg, &facts(), None, t0);
        let ready =
            |s: &NodeStatus| s.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").cloned().unwrap();
        assert_eq!((ready(&s0).status.as_str(), ready(&s0).reason.as_deref()), ("True", Some("KubeletReady")));
        let s1 = status(&cfg, &facts(), Some(&s0), t0 + Duration::from_secs(10));
        assert_eq!(ready(&s1).last_transition_time, ready(&s0).last_transition_time);
        assert_ne!(ready(&s1).last_heartbeat_time, ready(&s0).last_heartbeat_time);
        assert!(!changed(&s0, &s1), "only heartbeats moved");
        let mut canonical = s1.clone();
        canonical.capacity.as_mut().unwrap().insert("memory".into(), quantity("4Gi"));
        assert!(!changed(&s1, &canonical), "the API's canonical quantities are the same amounts");
        let sick = Facts {
            runtime_problem: Some("container runtime network not ready: NetworkReady=false".into()),
            ..facts()
        };
        let s2 = status(&cfg, &sick, Some(&s1), t0 + Duration::from_secs(20));
        let r = ready(&s2);
        assert_eq!((r.status.as_str(), r.reason.as_deref()), ("False", Some("KubeletNotReady")));
        assert_eq!(r.message.as_deref(), Some("container runtime network not ready: NetworkReady=false"));
        assert_ne!(r.last_transition_time, ready(&s1).last_transition_time);
        assert!(changed(&s1, &s2));
        let types: Vec<String> = s2.conditions.unwrap().into_iter().map(|c| c.type_).collect();
        assert_eq!(types, ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]);
    }
}
