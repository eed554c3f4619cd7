//! Kubelet admission: whether a pod may run on this node, decided before its worker starts
//! (`pkg/kubelet/lifecycle/predicate.go` and the capabilities check). A refused pod ends
//! Failed with the reason and "Pod was rejected: <message>", as the kubelet's rejectPod
//! writes it. Pure: the node and the pods already admitted are given.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, NodeSelectorRequirement, NodeSelectorTerm, Pod};

use crate::model::{self, is_sidecar};
use crate::quantity::Quantity;

/// Why a pod was refused: the pod status reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub message: String,
}

impl Refusal {
    fn new(reason: &str, message: impl Into<String>) -> Refusal {
        Refusal { reason: reason.into(), message: message.into() }
    }
}

/// What admission knows of the node.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Taints with effect NoExecute (the only ones the kubelet checks).
    pub no_execute_taints: Vec<(String, String)>,
    pub allocatable_millicpu: i128,
    pub allocatable_memory: i128,
    pub max_pods: usize,
}

/// The RuntimeClass handler wasmlet serves.
pub const HANDLER: &str = crate::node::config::HANDLER;

/// How a pod's runtimeClassName resolved: no class, the class's handler, or why it could not
/// be resolved (the RuntimeClass is missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    Default,
    Named { class: String, handler: String },
    Unresolved { class: String, why: String },
}

/// The resources a pod asks for (cpu in millicores, memory in bytes), as the scheduler adds
/// them: app containers and sidecars together, or the largest init container with the
/// sidecars started before it, whichever is more.
pub fn requests(pod: &Pod) -> (i128, i128) {
    let spec = model::spec(pod);
    let one = |c: &Container| {
        let r = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let get = |k: &str| r.and_then(|r| r.get(k)).and_then(|q| Quantity::parse(&q.0).ok());
        (get("cpu").map_or(0, |q| q.ceil_millis()), get("memory").map_or(0, |q| q.ceil_units()))
    };
    let add = |a: (i128, i128), b: (i128, i128)| (a.0 + b.0, a.1 + b.1);
    let mut sidecars = (0, 0);
    let mut init_peak = (0, 0);
    for c in spec.init_containers.iter().flatten() {
        if is_sidecar(c) {
            sidecars = add(sidecars, one(c));
        } else {
            let at = add(sidecars, one(c));
            init_peak = (init_peak.0.max(at.0), init_peak.1.max(at.1));
        }
    }
    let apps = spec.containers.iter().map(one).fold(sidecars, add);
    let overhead = spec.overhead.as_ref();
    let extra = |k: &str| overhead.and_then(|o| o.get(k)).and_then(|q| Quantity::parse(&q.0).ok());
    let (cpu, memory) = (apps.0.max(init_peak.0), apps.1.max(init_peak.1));
    (cpu + extra("cpu").map_or(0, |q| q.ceil_millis()), memory + extra("memory").map_or(0, |q| q.ceil_units()))
}

fn matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((value.and_then(number), values.first().and_then(|s| number(s))), (Some(v), Some(x)) if v > x),
        "Lt" => matches!((value.and_then(number), values.first().and_then(|s| number(s))), (Some(v), Some(x)) if v < x),
        _ => false,
    }
}

fn term_matches(t: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let (exprs, fields) =
        (t.match_expressions.as_deref().unwrap_or_default(), t.match_fields.as_deref().unwrap_or_default());
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs.iter().all(|r| matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| r.key == "metadata.name" && matches(r, Some(&node.name)))
}

/// Whether the pod's nodeSelector and required node affinity match the node.
pub fn affinity_matches(pod: &Pod, node: &NodeInfo) -> bool {
    let spec = model::spec(pod);
    let selector_ok =
        spec.node_selector.iter().flatten().all(|(k, v)| node.labels.get(k).is_some_and(|have| have == v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref());
    selector_ok && required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

/// Whether one of the pod's tolerations tolerates the taint `key=value:effect`.
pub(crate) fn tolerates(pod: &Pod, key: &str, value: &str, effect: &str) -> bool {
    model::spec(pod).tolerations.iter().flatten().any(|t| {
        let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == effect);
        let key_ok = t.key.as_deref().is_none_or(|k| k.is_empty() || k == key);
        let value_ok = match t.operator.as_deref().unwrap_or("Equal") {
            "Exists" => true,
            _ => t.value.as_deref().unwrap_or_default() == value,
        };
        effect_ok && key_ok && value_ok
    })
}

/// What in the pod wasmlet cannot honour, in the kubelet's words for a disallowed feature
/// and why a wasm node disallows it.
fn forbidden(pod: &Pod) -> Option<String> {
    let spec = model::spec(pod);
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let privileged = |c: &Container| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
    if spec.containers.iter().any(privileged) {
        return Some(format!(
            "pod with UID \"{uid}\" specified privileged container, but is disallowed: wasm guests have no host privileges to be given"
        ));
    }
    if spec.init_containers.iter().flatten().any(privileged) {
        return Some(format!(
            "pod with UID \"{uid}\" specified privileged init container, but is disallowed: wasm guests have no host privileges to be given"
        ));
    }
    if spec.host_pid == Some(true) {
        return Some(format!(
            "pod with UID \"{uid}\" specified host PID, but is disallowed: wasm guests cannot see or signal the node's processes"
        ));
    }
    if spec.host_ipc == Some(true) {
        return Some(format!(
            "pod with UID \"{uid}\" specified host ipc, but is disallowed: wasm guests have no System V IPC to share with the node"
        ));
    }
    None
}

/// Admits the pod to the node with `others` (the pods already admitted and not finished), or
/// says why not.
pub fn admit(pod: &Pod, node: &NodeInfo, others: &[&Pod], handler: &Handler) -> Result<(), Refusal> {
    match handler {
        Handler::Default => {}
        Handler::Named { handler, .. } if handler == HANDLER => {}
        Handler::Named { class, handler } => {
            return Err(Refusal::new(
                "RuntimeHandlerNotSupported",
                format!(
                    "RuntimeClass \"{class}\" names the handler \"{handler}\"; this node runs only \"{HANDLER}\" (wasm)"
                ),
            ));
        }
        Handler::Unresolved { class, why } => {
            return Err(Refusal::new("RuntimeHandlerNotSupported", format!("RuntimeClass \"{class}\": {why}")));
        }
    }
    if let Some(message) = forbidden(pod) {
        return Err(Refusal::new("Forbidden", message));
    }
    // The scheduler's admission checks, in its order: resources, node affinity, node name.
    let resource = |name: &str, requested: i128, used: i128, capacity: i128| {
        Refusal::new(
            &format!("OutOf{name}"),
            format!(
                "Node didn't have enough resource: {name}, requested: {requested}, used: {used}, capacity: {capacity}"
            ),
        )
    };
    if others.len() + 1 > node.max_pods {
        return Err(resource("pods", 1, others.len() as i128, node.max_pods as i128));
    }
    let (cpu, memory) = requests(pod);
    let used = others.iter().map(|p| requests(p)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if cpu > 0 && used.0 + cpu > node.allocatable_millicpu {
        return Err(resource("cpu", cpu, used.0, node.allocatable_millicpu));
    }
    if memory > 0 && used.1 + memory > node.allocatable_memory {
        return Err(resource("memory", memory, used.1, node.allocatable_memory));
    }
    if !affinity_matches(pod, node) {
        return Err(Refusal::new(
            "NodeAffinity",
            "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector",
        ));
    }
    if model::spec(pod).node_name.as_deref().is_some_and(|n| !n.is_empty() && n != node.name) {
        return Err(Refusal::new(
            "NodeName",
            "Predicate NodeName failed: node(s) didn't match the requested node name",
        ));
    }
    if node.no_execute_taints.iter().any(|(k, v)| !tolerates(pod, k, v, "NoExecute")) {
        return Err(Refusal::new(
            "TaintToleration",
            "Predicate TaintToleration failed: node(s) had untolerated taint(s)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "edge".into(),
            labels: [("kubernetes.io/hostname", "edge"), ("zone", "a")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            no_execute_taints: Vec::new(),
            allocatable_millicpu: 2000,
            allocatable_memory: 1 << 30,
            max_pods: 3,
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "uid": "u1"}, "spec": spec})).unwrap()
    }

    fn app(cpu: &str, memory: &str) -> serde_json::Value {
        serde_json::json!({"name": "c", "image": "i", "resources": {"requests": {"cpu": cpu, "memory": memory}}})
    }

    #[test]
    fn requests_add_apps_and_sidecars_and_take_the_larger_init() {
        let p = pod(serde_json::json!({
            "initContainers": [
                {"name": "side", "image": "i", "restartPolicy": "Always", "resources": {"requests": {"cpu": "100m"}}},
                {"name": "big", "image": "i", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}
            ],
            "containers": [app("250m", "64Mi"), app("0.25", "64Mi")]
        }));
        // apps 500m + sidecar 100m = 600m; init peak 1000m + 100m = 1100m.
        assert_eq!(requests(&p), (1100, 1 << 30));
        let small = pod(serde_json::json!({"containers": [app("1000m", "1Mi")], "overhead": {"cpu": "10m"}}));
        assert_eq!(requests(&small), (1010, 1 << 20));
    }

    #[test]
    fn resources_refuse_with_the_kubelets_reasons() {
        let n = node();
        let busy = pod(serde_json::json!({"containers": [app("1500m", "512Mi")]}));
        let p = pod(serde_json::json!({"containers": [app("1", "64Mi")]}));
        let e = admit(&p, &n, &[&busy], &Handler::Default).unwrap_err();
        assert_eq!(e.reason, "OutOfcpu");
        assert_eq!(e.message, "Node didn't have enough resource: cpu, requested: 1000, used: 1500, capacity: 2000");
        let mem = pod(serde_json::json!({"containers": [app("10m", "600Mi")]}));
        assert_eq!(admit(&mem, &n, &[&busy], &Handler::Default).unwrap_err().reason, "OutOfmemory");
        let none = pod(serde_json::json!({"containers": [{"name": "c", "image": "i"}]}));
        assert!(admit(&none, &n, &[&busy, &busy], &Handler::Default).is_ok());
        let e = admit(&none, &n, &[&busy, &busy, &busy], &Handler::Default).unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.message.as_str()),
            ("OutOfpods", "Node didn't have enough resource: pods, requested: 1, used: 3, capacity: 3")
        );
    }

    #[test]
    fn node_affinity_selector_and_name() {
        let n = node();
        let sel = |k: &str, v: &str| {
            pod(serde_json::json!({"nodeSelector": {k: v}, "containers": [{"name": "c", "image": "i"}]}))
        };
        assert!(admit(&sel("zone", "a"), &n, &[], &Handler::Default).is_ok());
        let e = admit(&sel("zone", "b"), &n, &[], &Handler::Default).unwrap_err();
        assert_eq!(e.reason, "NodeAffinity");
        assert_eq!(e.message, "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector");
        let aff = |op: &str, values: &[&str]| {
            pod(serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": op, "values": values}]}]}}},
                "containers": [{"name": "c", "image": "i"}]}))
        };
        assert!(admit(&aff("In", &["a", "b"]), &n, &[], &Handler::Default).is_ok());
        assert!(admit(&aff("NotIn", &["a"]), &n, &[], &Handler::Default).is_err());
        assert!(admit(&aff("Exists", &[]), &n, &[], &Handler::Default).is_ok());
        assert!(admit(&aff("DoesNotExist", &[]), &n, &[], &Handler::Default).is_err());
        let other = pod(serde_json::json!({"nodeName": "elsewhere", "containers": [{"name": "c", "image": "i"}]}));
        assert_eq!(admit(&other, &n, &[], &Handler::Default).unwrap_err().reason, "NodeName");
    }

    #[test]
    fn handlers_and_features_wasm_cannot_honour() {
        let n = node();
        let plain = pod(serde_json::json!({"containers": [{"name": "c", "image": "i"}]}));
        let ours = Handler::Named { class: "wasmlet".into(), handler: "wasmlet".into() };
        assert!(admit(&plain, &n, &[], &ours).is_ok());
        let runc = Handler::Named { class: "runc".into(), handler: "runc".into() };
        let e = admit(&plain, &n, &[], &runc).unwrap_err();
        assert_eq!(e.reason, "RuntimeHandlerNotSupported");
        assert!(e.message.contains("\"runc\""), "{}", e.message);
        let missing = Handler::Unresolved { class: "gone".into(), why: "RuntimeClass \"gone\" not found".into() };
        assert_eq!(admit(&plain, &n, &[], &missing).unwrap_err().reason, "RuntimeHandlerNotSupported");
        let host_pid = pod(serde_json::json!({"hostPID": true, "containers": [{"name": "c", "image": "i"}]}));
        let e = admit(&host_pid, &n, &[], &Handler::Default).unwrap_err();
        assert_eq!(e.reason, "Forbidden");
        assert!(e.message.starts_with("pod with UID \"u1\" specified host PID, but is disallowed"), "{}", e.message);
        let privileged = pod(
            serde_json::json!({"containers": [{"name": "c", "image": "i", "securityContext": {"privileged": true}}]}),
        );
        assert!(admit(&privileged, &n, &[], &Handler::Default).unwrap_err().message.contains("privileged container"));
        let ipc = pod(serde_json::json!({"hostIPC": true, "containers": [{"name": "c", "image": "i"}]}));
        assert!(admit(&ipc, &n, &[], &Handler::Default).unwrap_err().message.contains("host ipc"));
    }

    #[test]
    fn no_execute_taints_need_a_toleration() {
        let mut n = node();
        n.no_execute_taints.push(("maintenance".into(), "true".into()));
        let plain = pod(serde_json::json!({"containers": [{"name": "c", "image": "i"}]}));
        assert_eq!(admit(&plain, &n, &[], &Handler::Default).unwrap_err().reason, "TaintToleration");
        let everything = pod(
            serde_json::json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "c", "image": "i"}]}),
        );
        assert!(admit(&everything, &n, &[], &Handler::Default).is_ok());
    }
}
