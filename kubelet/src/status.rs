//! The pod's API status, computed as the kubelet does (`generateAPIPodStatus`,
//! `convertToAPIContainerStatuses`, `getPhase`, `status/generate.go`): a pure function of the
//! spec, what the runtime reports, the probe results and the remembered start failures.

use std::collections::HashMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::model::{self, Instance, Observed, ProbeResults, State, SyncError, is_sidecar};

/// Converts a wall-clock time to the API's.
pub fn time(t: SystemTime) -> Time {
    // Seconds precision, as the API serializes it.
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Everything the status is computed from.
pub struct Input<'a> {
    pub pod: &'a Pod,
    pub observed: &'a Observed,
    pub probes: &'a ProbeResults,
    /// Start failures by container name (CrashLoopBackOff, ErrImagePull, ...).
    pub sync_errors: &'a HashMap<String, SyncError>,
    pub old: Option<&'a PodStatus>,
    pub host_ip: &'a str,
    pub start_time: Option<SystemTime>,
    /// The pod is being torn down for good (deleted, or finished), so nothing restarts.
    pub terminal: bool,
    /// Why the kubelet ended the pod (activeDeadlineSeconds passed, evicted), if it did.
    pub failed: Option<&'a Failure>,
    pub now: SystemTime,
}

/// The kubelet ended a running pod as Failed: the status reason and message, and whether the
/// pod gets the DisruptionTarget condition (an eviction for node pressure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
    pub disruption: bool,
}

impl Failure {
    pub fn deadline() -> Failure {
        Failure {
            reason: "DeadlineExceeded".into(),
            message: "Pod was active on the node longer than the specified deadline".into(),
            disruption: false,
        }
    }
}

/// The container ID as the API shows it.
pub fn container_id(id: &str) -> String {
    format!("wasmlet://{id}")
}

fn terminated(i: &Instance) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: i.exit_code,
        reason: (!i.reason.is_empty()).then(|| i.reason.clone()),
        message: (!i.message.is_empty()).then(|| i.message.clone()),
        started_at: i.started_at.map(time),
        finished_at: i.finished_at.map(time),
        container_id: Some(container_id(&i.id)),
        signal: None,
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.to_string()), message }),
        ..Default::default()
    }
}

/// The kubelet's ShouldContainerBeRestarted, with the container-level policy of sidecars and
/// init containers retried under Always as under OnFailure.
pub fn should_restart(c: &Container, spec: &PodSpec, latest: Option<&Instance>, deleting: bool, init: bool) -> bool {
    if deleting {
        return false;
    }
    let Some(latest) = latest else { return true };
    match latest.state {
        State::Running => false,
        State::Unknown | State::Created => true,
        State::Exited => {
            let policy = if is_sidecar(c) { "Always" } else { model::restart_policy(spec) };
            match policy {
                "Never" => false,
                "OnFailure" => latest.exit_code != 0,
                // Regular init containers are retried only until they succeed.
                _ if init && !is_sidecar(c) => latest.exit_code != 0,
                _ => true,
            }
        }
    }
}

fn convert(containers: &[Container], init: bool, x: &Input<'_>) -> Vec<ContainerStatus> {
    let spec = model::spec(x.pod);
    let default_reason = if spec.init_containers.as_ref().is_some_and(|i| !i.is_empty()) {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let deleting = x.pod.metadata.deletion_timestamp.is_some() || x.terminal;
    containers
        .iter()
        .map(|c| {
            let latest = x.observed.latest(&c.name);
            let mut s = ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                ..Default::default()
            };
            match latest {
                None => s.state = Some(waiting(default_reason, None)),
                Some(i) => {
                    s.container_id = Some(container_id(&i.id));
                    s.image_id = i.image_ref.clone();
                    s.restart_count = i.restart_count;
                    s.state = Some(match i.state {
                        State::Running => ContainerState {
                            running: Some(ContainerStateRunning { started_at: i.started_at.map(time) }),
                            ..Default::default()
                        },
                        State::Exited => ContainerState { terminated: Some(terminated(i)), ..Default::default() },
                        State::Created | State::Unknown => waiting(default_reason, None),
                    });
                    if let Some(p) = x.observed.previous(&c.name).filter(|p| p.exited()) {
                        s.last_state = Some(ContainerState { terminated: Some(terminated(p)), ..Default::default() });
                    }
                    let started = x.probes.started(&c.name, i);
                    s.started = Some(started);
                    s.ready = if init && !is_sidecar(c) {
                        i.exited() && i.exit_code == 0
                    } else {
                        x.probes.ready(&c.name, i)
                    };
                }
            }
            // A container that failed to start, and will be retried, is Waiting with the reason.
            let done_init = init && latest.is_some_and(|i| i.exited() && i.exit_code == 0) && !is_sidecar(c);
            if !done_init
                && should_restart(c, spec, latest, deleting, init)
                && let Some(err) = x.sync_errors.get(&c.name)
            {
                if s.state.as_ref().is_some_and(|st| st.terminated.is_some()) {
                    s.last_state = s.state.take();
                }
                s.state = Some(waiting(&err.reason, (!err.message.is_empty()).then(|| err.message.clone())));
            }
            s
        })
        .collect()
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.running.is_some())
}

fn term(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.state.as_ref().and_then(|st| st.terminated.as_ref())
}

fn last_term(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.last_state.as_ref().and_then(|st| st.terminated.as_ref())
}

fn is_waiting(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.waiting.is_some())
}

fn find<'s>(statuses: &'s [ContainerStatus], name: &str) -> Option<&'s ContainerStatus> {
    statuses.iter().find(|s| s.name == name)
}

/// Whether any app container has ever run (running or terminated now).
fn any_app_started(spec: &PodSpec, statuses: &[ContainerStatus]) -> bool {
    spec.containers.iter().any(|c| find(statuses, &c.name).is_some_and(|s| is_running(s) || term(s).is_some()))
}

/// The pod phase (`getPhase`).
pub fn phase(spec: &PodSpec, init: &[ContainerStatus], app: &[ContainerStatus], terminal: bool) -> &'static str {
    let (mut pending_init, mut failed_init) = (0, 0);
    let (mut unknown, mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0, 0);
    for c in spec.init_containers.iter().flatten() {
        let Some(s) = find(init, &c.name) else {
            if is_sidecar(c) {
                unknown += 1;
            } else {
                pending_init += 1;
            }
            continue;
        };
        if is_sidecar(c) {
            if is_running(s) {
                if s.started != Some(true) {
                    pending_init += 1;
                }
                running += 1;
            } else if is_waiting(s) && last_term(s).is_none() {
                pending_init += 1;
            }
            continue;
        }
        if is_running(s) {
            pending_init += 1;
        } else if let Some(t) = term(s) {
            if t.exit_code != 0 {
                failed_init += 1;
            }
        } else if is_waiting(s) {
            match last_term(s) {
                Some(t) if t.exit_code != 0 => failed_init += 1,
                Some(_) => {}
                None => pending_init += 1,
            }
        } else {
            pending_init += 1;
        }
    }
    for c in &spec.containers {
        let Some(s) = find(app, &c.name) else {
            unknown += 1;
            continue;
        };
        if is_running(s) {
            running += 1;
        } else if let Some(t) = term(s) {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if is_waiting(s) {
            if last_term(s).is_some() {
                stopped += 1;
            } else {
                waiting += 1;
            }
        } else {
            unknown += 1;
        }
    }
    let policy = model::restart_policy(spec);
    if failed_init > 0 && policy == "Never" {
        return "Failed";
    }
    if (pending_init > 0 && !any_app_started(spec, app)) || waiting > 0 {
        return "Pending";
    }
    if running > 0 && unknown == 0 {
        return "Running";
    }
    if running == 0 && stopped > 0 && unknown == 0 {
        if terminal {
            return if stopped == succeeded { "Succeeded" } else { "Failed" };
        }
        return match policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "Never" => "Failed",
            _ => "Running",
        };
    }
    "Pending"
}

fn go_list(names: &[String]) -> String {
    // Go's %s of a []string.
    format!("[{}]", names.join(" "))
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: kind.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.map(str::to_string),
        message,
        ..Default::default()
    }
}

fn initialized(spec: &PodSpec, init: &[ContainerStatus], app: &[ContainerStatus], phase: &str) -> PodCondition {
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    if inits.is_empty() {
        return condition("Initialized", true, None, None);
    }
    let (mut unknown, mut incomplete) = (Vec::new(), Vec::new());
    for c in inits {
        let Some(s) = find(init, &c.name) else {
            unknown.push(c.name.clone());
            continue;
        };
        let done = if is_sidecar(c) { s.started == Some(true) } else { term(s).is_some_and(|t| t.exit_code == 0) };
        if !done {
            incomplete.push(c.name.clone());
        }
    }
    if phase == "Succeeded" && unknown.is_empty() {
        return condition("Initialized", true, Some("PodCompleted"), None);
    }
    if any_app_started(spec, app) {
        return condition("Initialized", true, None, None);
    }
    let mut msgs = Vec::new();
    if !unknown.is_empty() {
        msgs.push(format!("containers with unknown status: {}", go_list(&unknown)));
    }
    if !incomplete.is_empty() {
        msgs.push(format!("containers with incomplete status: {}", go_list(&incomplete)));
    }
    if msgs.is_empty() {
        condition("Initialized", true, None, None)
    } else {
        condition("Initialized", false, Some("ContainersNotInitialized"), Some(msgs.join(", ")))
    }
}

fn containers_ready(spec: &PodSpec, init: &[ContainerStatus], app: &[ContainerStatus], phase: &str) -> PodCondition {
    let (mut unknown, mut unready) = (Vec::new(), Vec::new());
    let sidecars = spec.init_containers.iter().flatten().filter(|c| is_sidecar(c));
    for (c, statuses) in sidecars.map(|c| (c, init)).chain(spec.containers.iter().map(|c| (c, app))) {
        match find(statuses, &c.name) {
            Some(s) if !s.ready => unready.push(c.name.clone()),
            Some(_) => {}
            None => unknown.push(c.name.clone()),
        }
    }
    if phase == "Succeeded" && unknown.is_empty() {
        return condition("ContainersReady", false, Some("PodCompleted"), None);
    }
    if phase == "Failed" {
        return condition("ContainersReady", false, Some("PodFailed"), None);
    }
    let mut msgs = Vec::new();
    if !unknown.is_empty() {
        msgs.push(format!("containers with unknown status: {}", go_list(&unknown)));
    }
    if !unready.is_empty() {
        msgs.push(format!("containers with unready status: {}", go_list(&unready)));
    }
    if msgs.is_empty() {
        condition("ContainersReady", true, None, None)
    } else {
        condition("ContainersReady", false, Some("ContainersNotReady"), Some(msgs.join(", ")))
    }
}

fn ready(pod: &Pod, containers_ready: &PodCondition, old: Option<&PodStatus>) -> PodCondition {
    if containers_ready.status != "True" {
        return PodCondition { type_: "Ready".into(), ..containers_ready.clone() };
    }
    let conditions = old.and_then(|o| o.conditions.as_deref()).unwrap_or_default();
    let mut msgs = Vec::new();
    for gate in model::spec(pod).readiness_gates.iter().flatten() {
        match conditions.iter().find(|c| c.type_ == gate.condition_type) {
            None => msgs.push(format!(
                "corresponding condition of pod readiness gate \"{}\" does not exist.",
                gate.condition_type
            )),
            Some(c) if c.status != "True" => msgs.push(format!(
                "the status of pod readiness gate \"{}\" is not \"True\", but {}",
                gate.condition_type, c.status
            )),
            Some(_) => {}
        }
    }
    if msgs.is_empty() {
        condition("Ready", true, None, None)
    } else {
        condition("Ready", false, Some("ReadinessGatesNotReady"), Some(msgs.join(", ")))
    }
}

/// The QoS class: Guaranteed when every container's limits equal its requests for cpu and
/// memory, BestEffort when nothing is requested or limited, else Burstable.
pub fn qos_class(spec: &PodSpec) -> &'static str {
    let all = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    let (mut any, mut guaranteed) = (false, true);
    for c in all {
        let r = c.resources.as_ref();
        let limits = r.and_then(|r| r.limits.as_ref());
        let requests = r.and_then(|r| r.requests.as_ref());
        for res in ["cpu", "memory"] {
            let l = limits.and_then(|l| l.get(res));
            let q = requests.and_then(|q| q.get(res)).or(l);
            any |= l.is_some() || q.is_some();
            // Compared as amounts: `1000m` and `1` are the same CPU.
            let amount = |x: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
                x.and_then(|x| crate::quantity::Quantity::parse(&x.0).ok())
            };
            if l.is_none() || amount(q) != amount(l) {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// The pod's status.
pub fn generate(x: &Input<'_>) -> PodStatus {
    let spec = model::spec(x.pod);
    let init = convert(spec.init_containers.as_deref().unwrap_or_default(), true, x);
    let app = convert(&spec.containers, false, x);
    let old_phase = x.old.and_then(|o| o.phase.as_deref());
    let mut phase = phase(spec, &init, &app, x.terminal);
    let (mut reason, mut message) = (None, None);
    if let Some(p @ ("Succeeded" | "Failed")) = old_phase {
        // Terminal phases are sticky.
        phase = if p == "Succeeded" { "Succeeded" } else { "Failed" };
        reason = x.old.and_then(|o| o.reason.clone());
        message = x.old.and_then(|o| o.message.clone());
    }
    if let Some(f) = x.failed {
        phase = "Failed";
        reason = Some(f.reason.clone());
        message = Some(f.message.clone());
    }
    let sandbox_ready = x.observed.sandbox.as_ref().is_some_and(|s| s.ready);
    let all: Vec<ContainerStatus> = init.iter().chain(app.iter()).cloned().collect();
    let cready = containers_ready(spec, &init, &app, phase);
    let mut conditions = vec![
        condition("PodReadyToStartContainers", sandbox_ready, None, None),
        initialized(spec, &init, &all, phase),
        ready(x.pod, &cready, x.old),
        cready,
        condition("PodScheduled", true, None, None),
    ];
    let mut ours = vec!["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"];
    if let Some(f) = x.failed.filter(|f| f.disruption) {
        conditions.push(condition("DisruptionTarget", true, Some("TerminationByKubelet"), Some(f.message.clone())));
        ours.push("DisruptionTarget");
    }
    // Keep foreign conditions (readiness gates' own) and the transition times of unchanged ones.
    let old_conditions = x.old.and_then(|o| o.conditions.clone()).unwrap_or_default();
    for c in &mut conditions {
        let before = old_conditions.iter().find(|o| o.type_ == c.type_);
        c.last_transition_time = match before {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => Some(time(x.now)),
        };
    }
    conditions.extend(old_conditions.into_iter().filter(|c| !ours.contains(&c.type_.as_str())));
    let pod_ip = x.observed.sandbox.as_ref().map(|s| s.ip.clone()).filter(|ip| !ip.is_empty());
    let host_network = spec.host_network == Some(true);
    let pod_ip = if host_network { Some(x.host_ip.to_string()) } else { pod_ip };
    let host = (!x.host_ip.is_empty()).then(|| x.host_ip.to_string());
    PodStatus {
        phase: Some(phase.to_string()),
        reason,
        message,
        conditions: Some(conditions),
        host_ip: host.clone(),
        host_ips: host.map(|ip| vec![HostIP { ip }]),
        pod_ip: pod_ip.clone(),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
        start_time: x.start_time.map(time),
        qos_class: Some(qos_class(spec).to_string()),
        init_container_statuses: (!init.is_empty()).then_some(init),
        container_statuses: Some(app),
        ..Default::default()
    }
}

/// The condition of a given type.
pub fn get_condition<'s>(s: &'s PodStatus, kind: &str) -> Option<&'s PodCondition> {
    s.conditions.as_ref()?.iter().find(|c| c.type_ == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ProbeKind, Published};
    use crate::testutil::*;

    fn status_of(pod: &Pod, obs: &Observed, probes: &ProbeResults, errors: &HashMap<String, SyncError>) -> PodStatus {
        generate(&Input {
            pod,
            observed: obs,
            probes,
            sync_errors: errors,
            old: None,
            host_ip: "192.0.2.1",
            start_time: Some(t(0)),
            terminal: false,
            failed: None,
            now: t(100),
        })
    }

    fn cond<'s>(s: &'s PodStatus, kind: &str) -> (&'s str, Option<&'s str>, Option<&'s str>) {
        let c = get_condition(s, kind).unwrap();
        (c.status.as_str(), c.reason.as_deref(), c.message.as_deref())
    }

    #[test]
    fn a_pending_pod_with_init_containers() {
        let p = pod("Always", vec![container("i1"), container("i2")], vec![container("app")]);
        let i1 = container("i1");
        let obs = observed(vec![inst(&i1, 0, State::Running, 0, 0)]);
        let s = status_of(&p, &obs, &ProbeResults::default(), &HashMap::new());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let order: Vec<&str> = s.conditions.as_ref().unwrap().iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(order, ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]);
        assert_eq!(
            cond(&s, "Initialized"),
            ("False", Some("ContainersNotInitialized"), Some("containers with incomplete status: [i1 i2]"))
        );
        assert_eq!(
            cond(&s, "ContainersReady"),
            ("False", Some("ContainersNotReady"), Some("containers with unready status: [app]"))
        );
        assert_eq!(cond(&s, "Ready").1, Some("ContainersNotReady"));
        assert_eq!(cond(&s, "PodReadyToStartContainers").0, "True");
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(app.state.as_ref().unwrap().waiting.as_ref().unwrap().reason.as_deref(), Some("PodInitializing"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.88.0.2"));
        assert_eq!(s.host_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
    }

    #[test]
    fn running_ready_and_readiness_probe() {
        let app = with_probe(container("app"), "readiness");
        let p = pod("Always", vec![], vec![app.clone()]);
        let obs = observed(vec![inst(&app, 0, State::Running, 0, 0)]);
        let mut pr = ProbeResults::default();
        pr.declare("app", ProbeKind::Readiness);
        let s = status_of(&p, &obs, &pr, &HashMap::new());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").0, "False");
        assert_eq!(cond(&s, "Initialized"), ("True", None, None));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!((cs.started, cs.ready), (Some(true), false));
        assert_eq!(cs.container_id.as_deref(), Some("wasmlet://app-0"));
        pr.set("app", ProbeKind::Readiness, Some("app-0"), Published::Success);
        let s = status_of(&p, &obs, &pr, &HashMap::new());
        assert_eq!(cond(&s, "Ready"), ("True", None, None));
        assert_eq!(cond(&s, "ContainersReady").0, "True");
        // No readiness probe: ready once started; a startup probe holds "started" until it passes.
        let slow = with_probe(container("app"), "startup");
        let p = pod("Always", vec![], vec![slow.clone()]);
        let mut pr = ProbeResults::default();
        pr.declare("app", ProbeKind::Startup);
        let s = status_of(&p, &observed(vec![inst(&slow, 0, State::Running, 0, 0)]), &pr, &HashMap::new());
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!((cs.started, cs.ready), (Some(false), false));
    }

    #[test]
    fn crash_loop_shows_waiting_with_last_state_and_restart_count() {
        let app = container("app");
        let p = pod("Always", vec![], vec![app.clone()]);
        let obs = observed(vec![inst(&app, 0, State::Exited, 1, 0), inst(&app, 1, State::Exited, 2, 10)]);
        let mut errors = HashMap::new();
        errors.insert(
            "app".to_string(),
            SyncError {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 10s restarting failed container=app pod=web_default(uid-1)".into(),
            },
        );
        let s = status_of(&p, &obs, &ProbeResults::default(), &errors);
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.restart_count, 1);
        let w = cs.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (2, Some("Error")));
        assert_eq!(s.phase.as_deref(), Some("Running"), "Always: stopped containers are restarting");
        // Under Never nothing restarts: the terminated state shows, not the error.
        let p = pod("Never", vec![], vec![app.clone()]);
        let s = status_of(&p, &obs, &ProbeResults::default(), &errors);
        assert!(s.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.is_some());
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn phases_by_policy_and_exit() {
        let (a, b) = (container("a"), container("b"));
        for (policy, codes, want) in [
            ("Never", [0, 0], "Succeeded"),
            ("Never", [0, 1], "Failed"),
            ("OnFailure", [0, 0], "Succeeded"),
            ("OnFailure", [0, 1], "Running"),
            ("Always", [0, 0], "Running"),
        ] {
            let p = pod(policy, vec![], vec![a.clone(), b.clone()]);
            let obs = observed(vec![inst(&a, 0, State::Exited, codes[0], 0), inst(&b, 0, State::Exited, codes[1], 0)]);
            let s = status_of(&p, &obs, &ProbeResults::default(), &HashMap::new());
            assert_eq!(s.phase.as_deref(), Some(want), "{policy} {codes:?}");
        }
        // Torn down for good: Succeeded only if every container succeeded.
        let p = pod("Always", vec![], vec![a.clone()]);
        let obs = observed(vec![inst(&a, 0, State::Exited, 137, 0)]);
        let pr = ProbeResults::default();
        let errors = HashMap::new();
        let mut x = Input {
            pod: &p,
            observed: &obs,
            probes: &pr,
            sync_errors: &errors,
            old: None,
            host_ip: "",
            start_time: None,
            terminal: true,
            failed: None,
            now: t(0),
        };
        assert_eq!(generate(&x).phase.as_deref(), Some("Failed"));
        x.terminal = false;
        let deadline = Failure::deadline();
        x.failed = Some(&deadline);
        let s = generate(&x);
        assert_eq!((s.phase.as_deref(), s.reason.as_deref()), (Some("Failed"), Some("DeadlineExceeded")));
        assert_eq!(s.message.as_deref(), Some("Pod was active on the node longer than the specified deadline"));
        assert!(!s.conditions.iter().flatten().any(|c| c.type_ == "DisruptionTarget"));
        // Evicted for node pressure: the DisruptionTarget condition says so.
        let evicted = Failure {
            reason: "Evicted".into(),
            message: "The node was low on resource: memory. ".into(),
            disruption: true,
        };
        x.failed = Some(&evicted);
        let s = generate(&x);
        assert_eq!((s.phase.as_deref(), s.reason.as_deref()), (Some("Failed"), Some("Evicted")));
        let c = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "DisruptionTarget")
            .expect("a DisruptionTarget condition");
        assert_eq!((c.status.as_str(), c.reason.as_deref()), ("True", Some("TerminationByKubelet")));
        assert_eq!(c.message.as_deref(), Some("The node was low on resource: memory. "));
        // A terminal phase is sticky.
        let old = PodStatus { phase: Some("Succeeded".into()), ..Default::default() };
        let running = observed(vec![inst(&a, 1, State::Running, 0, 5)]);
        let x = Input { observed: &running, old: Some(&old), failed: None, ..x };
        assert_eq!(generate(&x).phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn init_failure_under_never_fails_the_pod_and_succeeded_pods_say_pod_completed() {
        let i1 = container("i1");
        let app = container("app");
        let p = pod("Never", vec![i1.clone()], vec![app.clone()]);
        let s = status_of(
            &p,
            &observed(vec![inst(&i1, 0, State::Exited, 2, 0)]),
            &ProbeResults::default(),
            &HashMap::new(),
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(cond(&s, "ContainersReady").1, Some("PodFailed"));
        let obs = observed(vec![inst(&i1, 0, State::Exited, 0, 0), inst(&app, 0, State::Exited, 0, 2)]);
        let s = status_of(&p, &obs, &ProbeResults::default(), &HashMap::new());
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&s, "Initialized"), ("True", Some("PodCompleted"), None));
        assert_eq!(cond(&s, "ContainersReady"), ("False", Some("PodCompleted"), None));
        let ics = &s.init_container_statuses.as_ref().unwrap()[0];
        assert!(ics.ready, "a regular init container that exited 0 is ready");
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.state.as_ref().unwrap().terminated.as_ref().unwrap().reason.as_deref(), Some("Completed"));
    }

    #[test]
    fn sidecars_count_toward_ready_and_initialized_waits_for_their_start() {
        let side = with_probe(sidecar("side"), "startup");
        let app = container("app");
        let p = pod("Always", vec![side.clone()], vec![app.clone()]);
        let mut pr = ProbeResults::default();
        pr.declare("side", ProbeKind::Startup);
        let obs = observed(vec![inst(&side, 0, State::Running, 0, 0)]);
        let s = status_of(&p, &obs, &pr, &HashMap::new());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(cond(&s, "Initialized").2, Some("containers with incomplete status: [side]"));
        pr.set("side", ProbeKind::Startup, Some("side-0"), Published::Success);
        let obs = observed(vec![inst(&side, 0, State::Running, 0, 0), inst(&app, 0, State::Running, 0, 1)]);
        let s = status_of(&p, &obs, &pr, &HashMap::new());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").0, "True");
        let unready = observed(vec![inst(&side, 1, State::Running, 0, 5), inst(&app, 0, State::Running, 0, 1)]);
        let s = status_of(&p, &unready, &pr, &HashMap::new());
        assert_eq!(cond(&s, "ContainersReady").2, Some("containers with unready status: [side]"));
        assert_eq!(cond(&s, "Initialized").0, "True", "an app container has started");
    }

    #[test]
    fn readiness_gates_and_foreign_conditions() {
        let app = container("app");
        let mut p = pod("Always", vec![], vec![app.clone()]);
        p.spec.as_mut().unwrap().readiness_gates =
            Some(vec![k8s_openapi::api::core::v1::PodReadinessGate { condition_type: "example.com/lb".into() }]);
        let obs = observed(vec![inst(&app, 0, State::Running, 0, 0)]);
        let s = status_of(&p, &obs, &ProbeResults::default(), &HashMap::new());
        assert_eq!(
            cond(&s, "Ready"),
            (
                "False",
                Some("ReadinessGatesNotReady"),
                Some("corresponding condition of pod readiness gate \"example.com/lb\" does not exist.")
            )
        );
        let old = PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "example.com/lb".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let pr = ProbeResults::default();
        let errors = HashMap::new();
        let s = generate(&Input {
            pod: &p,
            observed: &obs,
            probes: &pr,
            sync_errors: &errors,
            old: Some(&old),
            host_ip: "",
            start_time: None,
            terminal: false,
            failed: None,
            now: t(1),
        });
        assert_eq!(cond(&s, "Ready").0, "True");
        assert_eq!(cond(&s, "example.com/lb").0, "True", "foreign conditions are kept");
    }

    #[test]
    fn qos_classes() {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity as Q;
        let res = |l: &[(&str, &str)], r: &[(&str, &str)]| {
            let m = |x: &[(&str, &str)]| Some(x.iter().map(|(k, v)| (k.to_string(), Q(v.to_string()))).collect());
            Some(ResourceRequirements { limits: m(l), requests: m(r), ..Default::default() })
        };
        let spec = |r| PodSpec { containers: vec![Container { resources: r, ..container("a") }], ..Default::default() };
        assert_eq!(qos_class(&spec(None)), "BestEffort");
        assert_eq!(qos_class(&spec(res(&[("cpu", "1"), ("memory", "1Gi")], &[]))), "Guaranteed");
        assert_eq!(qos_class(&spec(res(&[("memory", "1Gi")], &[]))), "Burstable");
        assert_eq!(qos_class(&spec(res(&[("cpu", "1"), ("memory", "1Gi")], &[("cpu", "500m")]))), "Burstable");
        // Equal amounts written differently are equal.
        let same = res(&[("cpu", "1"), ("memory", "1Gi")], &[("cpu", "1000m"), ("memory", "1024Mi")]);
        assert_eq!(qos_class(&spec(same)), "Guaranteed");
    }
}
