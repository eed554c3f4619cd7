//! What a pod worker does next (the kubelet's `computePodActions` and
//! `computeInitContainerActions`), as a pure function of the spec, the observed containers,
//! the probe results and the back-off state. The worker carries the plan out through the CRI.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::backoff::Backoff;
use super::model::{self, Instance, Observed, ProbeResults, State, container_hash, is_sidecar};
use super::probe::{ProbeKind, Published};
use super::status::should_restart;

/// Why a running container is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    SpecChanged,
    Liveness,
    Startup,
    Unknown,
}

/// A container instance to stop, with the event message (`Killing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    pub id: String,
    pub name: String,
    pub reason: KillReason,
    pub message: String,
}

/// A container to create and start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub name: String,
    pub init: bool,
    /// The restart count of the new instance.
    pub restart_count: i32,
}

/// A container waiting out its crash-loop back-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingOff {
    pub name: String,
    /// The status message ("back-off 40s restarting failed container=...").
    pub message: String,
    /// When the wait ends.
    pub until: SystemTime,
}

/// The plan for one sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Stop every container and the sandbox (a dead sandbox, or a pod with nothing left to run).
    pub kill_pod: bool,
    /// Make a new sandbox (after `kill_pod` when one exists) and start from the first init
    /// container.
    pub create_sandbox: bool,
    pub kills: Vec<Kill>,
    pub starts: Vec<Start>,
    pub backing_off: Vec<BackingOff>,
    /// An init container failed under restartPolicy Never: the pod has failed.
    pub init_failed: bool,
}

impl Plan {
    /// The earliest end of a back-off: when the worker must look again.
    pub fn wake_at(&self) -> Option<SystemTime> {
        self.backing_off.iter().map(|b| b.until).min()
    }
}

/// The kubelet's `format.Pod`: `name_namespace(uid)`.
pub fn format_pod(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!(
        "{}_{}({})",
        m.name.as_deref().unwrap_or_default(),
        m.namespace.as_deref().unwrap_or("default"),
        m.uid.as_deref().unwrap_or_default()
    )
}

/// A duration as Go prints it (`40s`, `5m0s`, `1.5s`).
pub fn go_duration(d: Duration) -> String {
    // Under a second Go uses the largest unit that keeps an integer part: 523ms, 1.5µs, 0s.
    let ns = d.as_nanos();
    if ns < 1_000_000_000 {
        let (unit, size) = match ns {
            0 => return "0s".into(),
            1..1_000 => ("ns", 1),
            1_000..1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        let fraction = format!("{:09}", ns % size);
        let fraction = fraction[9 - size.ilog10() as usize..].trim_end_matches('0');
        let dot = if fraction.is_empty() { "" } else { "." };
        return format!("{}{dot}{fraction}{unit}", ns / size);
    }
    let secs = d.as_secs();
    let mut s = match d.subsec_millis() {
        0 => format!("{}s", secs % 60),
        ms => format!("{}.{:03}", secs % 60, ms).trim_end_matches('0').to_string() + "s",
    };
    if secs >= 60 {
        s = format!("{}m{s}", (secs / 60) % 60);
    }
    if secs >= 3600 {
        s = format!("{}h{s}", secs / 3600);
    }
    s
}

fn backoff_key(pod: &Pod, c: &Container) -> String {
    format!("{}_{}_{}", model::pod_key(pod), c.name, container_hash(c))
}

/// The latest exited instance of a container, if any.
fn last_exited<'o>(observed: &'o Observed, name: &str) -> Option<&'o Instance> {
    observed.instances.iter().filter(|i| i.name == name && i.exited()).max_by_key(|i| (i.created_at, i.restart_count))
}

/// Adds a start, or a back-off wait when the last exit is too recent (`doBackOff`).
fn start_or_back_off(plan: &mut Plan, pod: &Pod, c: &Container, init: bool, x: &mut Ctx<'_>) {
    let restart_count = x.observed.latest(&c.name).map_or(0, |i| i.restart_count + 1);
    if let Some(dead) = last_exited(x.observed, &c.name) {
        let key = backoff_key(pod, c);
        let finished = dead.finished_at.unwrap_or(dead.created_at);
        if x.backoff.in_backoff_since(&key, finished, x.now) {
            let wait = x.backoff.get(&key).unwrap_or_default();
            plan.backing_off.push(BackingOff {
                name: c.name.clone(),
                message: format!(
                    "back-off {} restarting failed container={} pod={}",
                    go_duration(wait),
                    c.name,
                    format_pod(pod)
                ),
                until: x.backoff.ends_at(&key, finished).unwrap_or(x.now),
            });
            return;
        }
        x.backoff.next(&key, finished, x.now);
    }
    plan.starts.push(Start { name: c.name.clone(), init, restart_count });
}

struct Ctx<'a> {
    observed: &'a Observed,
    probes: &'a ProbeResults,
    backoff: &'a mut Backoff,
    now: SystemTime,
}

/// Why a running container must be killed, if it must.
fn kill_reason(c: &Container, i: &Instance, probes: &ProbeResults) -> Option<(KillReason, String)> {
    if i.hash != container_hash(c) {
        return Some((KillReason::SpecChanged, format!("Container {} definition changed", c.name)));
    }
    if probes.get(&c.name, ProbeKind::Liveness, &i.id) == Some(Published::Failure) {
        return Some((KillReason::Liveness, format!("Container {} failed liveness probe", c.name)));
    }
    if probes.get(&c.name, ProbeKind::Startup, &i.id) == Some(Published::Failure) {
        return Some((KillReason::Startup, format!("Container {} failed startup probe", c.name)));
    }
    None
}

/// Init containers: returns true when initialization is complete (app containers may run).
fn init_actions(pod: &Pod, plan: &mut Plan, x: &mut Ctx<'_>) -> bool {
    let spec = model::spec(pod);
    let policy = model::restart_policy(spec);
    // Regular init containers do not run again once an app container has run in this pod.
    let app_ran = spec.containers.iter().any(|c| x.observed.latest(&c.name).is_some());
    for c in spec.init_containers.iter().flatten() {
        let latest = x.observed.latest(&c.name);
        if is_sidecar(c) {
            match latest {
                Some(i) if i.state == State::Running => {
                    if let Some((reason, message)) = kill_reason(c, i, x.probes) {
                        plan.kills.push(Kill {
                            id: i.id.clone(),
                            name: c.name.clone(),
                            reason,
                            message: format!("{message}, will be restarted"),
                        });
                        start_or_back_off(plan, pod, c, true, x);
                        return app_ran;
                    }
                    if !x.probes.started(&c.name, i) && !app_ran {
                        // The next init container waits for this sidecar to have started.
                        return false;
                    }
                }
                _ => {
                    if let Some(i) = latest.filter(|i| i.state == State::Unknown) {
                        plan.kills.push(unknown_kill(c, i));
                    }
                    start_or_back_off(plan, pod, c, true, x);
                    if !app_ran {
                        return false;
                    }
                }
            }
            continue;
        }
        if app_ran {
            continue;
        }
        match latest {
            None => {
                plan.starts.push(Start { name: c.name.clone(), init: true, restart_count: 0 });
                return false;
            }
            Some(i) if i.state == State::Running => return false,
            Some(i) if i.exited() && i.exit_code == 0 => continue,
            Some(i) if i.exited() => {
                if policy == "Never" {
                    plan.init_failed = true;
                } else {
                    start_or_back_off(plan, pod, c, true, x);
                }
                return false;
            }
            Some(i) => {
                if i.state == State::Unknown {
                    plan.kills.push(unknown_kill(c, i));
                }
                start_or_back_off(plan, pod, c, true, x);
                return false;
            }
        }
    }
    true
}

fn unknown_kill(c: &Container, i: &Instance) -> Kill {
    Kill {
        id: i.id.clone(),
        name: c.name.clone(),
        reason: KillReason::Unknown,
        message: "Container is in \"Unknown\" state, try killing it before restart".into(),
    }
}

/// The plan for one sync of a pod that is not being deleted.
pub fn compute(pod: &Pod, observed: &Observed, probes: &ProbeResults, backoff: &mut Backoff, now: SystemTime) -> Plan {
    let spec = model::spec(pod);
    let mut plan = Plan::default();
    let sandbox_ok = observed.sandbox.as_ref().is_some_and(|s| s.ready);
    if !sandbox_ok {
        let has_run = !observed.instances.is_empty();
        if observed.sandbox.is_some() {
            plan.kill_pod = true;
        }
        // Under Never, a pod whose containers have run does not get a second sandbox.
        if !(model::restart_policy(spec) == "Never" && has_run) {
            plan.create_sandbox = true;
            // Everything starts over in the new sandbox: the first init container, or every
            // app container.
            let first_init = spec.init_containers.iter().flatten().next();
            match first_init {
                Some(c) => plan.starts.push(Start {
                    name: c.name.clone(),
                    init: true,
                    restart_count: observed.latest(&c.name).map_or(0, |i| i.restart_count + 1),
                }),
                None => {
                    for c in &spec.containers {
                        let restart_count = observed.latest(&c.name).map_or(0, |i| i.restart_count + 1);
                        plan.starts.push(Start { name: c.name.clone(), init: false, restart_count });
                    }
                }
            }
        }
        return plan;
    }
    let mut x = Ctx { observed, probes, backoff, now };
    if !init_actions(pod, &mut plan, &mut x) {
        return plan;
    }
    let policy = model::restart_policy(spec);
    let mut keep = 0;
    for c in &spec.containers {
        let latest = observed.latest(&c.name);
        match latest {
            Some(i) if i.state == State::Running => {
                let Some((reason, message)) = kill_reason(c, i, probes) else {
                    keep += 1;
                    continue;
                };
                // A changed spec restarts whatever the policy; a failed probe restarts unless Never.
                let restart = reason == KillReason::SpecChanged || policy != "Never";
                let message = if restart { format!("{message}, will be restarted") } else { message };
                plan.kills.push(Kill { id: i.id.clone(), name: c.name.clone(), reason, message });
                if restart {
                    start_or_back_off(&mut plan, pod, c, false, &mut x);
                }
            }
            _ => {
                if should_restart(c, spec, latest, false, false) {
                    if let Some(i) = latest.filter(|i| i.state == State::Unknown) {
                        plan.kills.push(unknown_kill(c, i));
                    }
                    start_or_back_off(&mut plan, pod, c, false, &mut x);
                }
            }
        }
    }
    if keep == 0 && plan.starts.is_empty() && plan.backing_off.is_empty() && plan.kills.is_empty() {
        // Nothing runs and nothing will: the pod is done (sidecars are stopped with it).
        plan.kill_pod = true;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn plan(pod: &Pod, obs: &Observed, probes: &ProbeResults, b: &mut Backoff, now: u64) -> Plan {
        compute(pod, obs, probes, b, t(now))
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.starts.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_new_pod_gets_a_sandbox_and_its_first_init_container() {
        let p = pod("Always", vec![container("init")], vec![container("app")]);
        let mut b = Backoff::default();
        let none = Observed::default();
        let got = plan(&p, &none, &ProbeResults::default(), &mut b, 0);
        assert!(got.create_sandbox && !got.kill_pod);
        assert_eq!(names(&got), ["init"]);
        let q = pod("Always", vec![], vec![container("a"), container("b")]);
        assert_eq!(names(&plan(&q, &none, &ProbeResults::default(), &mut b, 0)), ["a", "b"]);
    }

    #[test]
    fn init_containers_run_in_order_each_to_success() {
        let (i1, i2, app) = (container("i1"), container("i2"), container("app"));
        let p = pod("Always", vec![i1.clone(), i2.clone()], vec![app.clone()]);
        let mut b = Backoff::default();
        let pr = ProbeResults::default();
        let got = plan(&p, &observed(vec![]), &pr, &mut b, 0);
        assert_eq!(names(&got), ["i1"]);
        let running = observed(vec![inst(&i1, 0, State::Running, 0, 0)]);
        assert!(plan(&p, &running, &pr, &mut b, 1).starts.is_empty(), "waits for the running init container");
        let done = observed(vec![inst(&i1, 0, State::Exited, 0, 0)]);
        assert_eq!(names(&plan(&p, &done, &pr, &mut b, 2)), ["i2"]);
        let both = observed(vec![inst(&i1, 0, State::Exited, 0, 0), inst(&i2, 0, State::Exited, 0, 1)]);
        assert_eq!(names(&plan(&p, &both, &pr, &mut b, 3)), ["app"]);
        // Once the app has run, init containers are not run again, even if they are gone.
        let app_only = observed(vec![inst(&app, 0, State::Running, 0, 3)]);
        assert_eq!(plan(&p, &app_only, &pr, &mut b, 4), Plan::default());
    }

    #[test]
    fn a_failed_init_container_fails_the_pod_under_never_and_is_retried_with_back_off_otherwise() {
        let i1 = container("i1");
        let failed = observed(vec![inst(&i1, 0, State::Exited, 1, 0)]);
        let mut b = Backoff::default();
        let pr = ProbeResults::default();
        let never = pod("Never", vec![i1.clone()], vec![container("app")]);
        let got = plan(&never, &failed, &pr, &mut b, 5);
        assert!(got.init_failed && got.starts.is_empty());
        for policy in ["Always", "OnFailure"] {
            let mut b = Backoff::default();
            let p = pod(policy, vec![i1.clone()], vec![container("app")]);
            let got = plan(&p, &failed, &pr, &mut b, 5);
            assert_eq!(got.starts, [Start { name: "i1".into(), init: true, restart_count: 1 }], "{policy}");
            let again = observed(vec![inst(&i1, 0, State::Exited, 1, 0), inst(&i1, 1, State::Exited, 1, 6)]);
            let got = plan(&p, &again, &pr, &mut b, 8);
            assert!(got.starts.is_empty());
            assert_eq!(got.backing_off.len(), 1, "{policy}: second failure backs off");
            assert_eq!(got.backing_off[0].until, t(17), "10 s after finishing at 7");
        }
    }

    #[test]
    fn restart_policies_decide_which_exits_restart() {
        let app = container("app");
        let pr = ProbeResults::default();
        for (policy, code, restarts) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 3, true),
            ("Never", 0, false),
            ("Never", 3, false),
        ] {
            let p = pod(policy, vec![], vec![app.clone()]);
            let obs = observed(vec![inst(&app, 0, State::Exited, code, 0)]);
            let got = plan(&p, &obs, &pr, &mut Backoff::default(), 2);
            assert_eq!(!got.starts.is_empty(), restarts, "{policy} exit {code}");
            assert_eq!(got.kill_pod, !restarts, "{policy} exit {code}: a pod with nothing to run is done");
        }
    }

    #[test]
    fn crash_loop_back_off_message_and_timing() {
        let app = container("app");
        let p = pod("Always", vec![], vec![app.clone()]);
        let pr = ProbeResults::default();
        let mut b = Backoff::default();
        let mut instances = vec![inst(&app, 0, State::Exited, 1, 0)];
        // First exit (finished at 1): restart at once.
        assert_eq!(plan(&p, &observed(instances.clone()), &pr, &mut b, 1).starts.len(), 1);
        let mut at = 1;
        let mut waits = Vec::new();
        for n in 1..=7 {
            at += 1;
            instances.push(inst(&app, n, State::Exited, 1, at));
            let finished = at + 1;
            let got = plan(&p, &observed(instances.clone()), &pr, &mut b, finished);
            assert!(got.starts.is_empty());
            let wait = got.backing_off[0].until.duration_since(t(finished)).unwrap();
            waits.push(wait.as_secs());
            if n == 3 {
                assert_eq!(
                    got.backing_off[0].message,
                    "back-off 40s restarting failed container=app pod=web_default(uid-1)"
                );
            }
            if n == 7 {
                assert_eq!(
                    got.backing_off[0].message,
                    "back-off 5m0s restarting failed container=app pod=web_default(uid-1)"
                );
            }
            at = finished + wait.as_secs();
            let go = plan(&p, &observed(instances.clone()), &pr, &mut b, at);
            assert_eq!(go.starts[0].restart_count, n + 1);
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn liveness_failure_kills_and_restarts_unless_never() {
        let app = with_probe(container("app"), "liveness");
        let mut pr = ProbeResults::default();
        pr.declare("app", ProbeKind::Liveness);
        pr.set("app", ProbeKind::Liveness, Some("app-0"), Published::Failure);
        let obs = observed(vec![inst(&app, 0, State::Running, 0, 0)]);
        let p = pod("Always", vec![], vec![app.clone()]);
        let got = plan(&p, &obs, &pr, &mut Backoff::default(), 30);
        assert_eq!(got.kills[0].message, "Container app failed liveness probe, will be restarted");
        assert_eq!(got.kills[0].reason, KillReason::Liveness);
        assert_eq!(got.starts[0].restart_count, 1);
        let never = pod("Never", vec![], vec![app.clone()]);
        let got = plan(&never, &obs, &pr, &mut Backoff::default(), 30);
        assert_eq!(got.kills[0].message, "Container app failed liveness probe");
        assert!(got.starts.is_empty());
        // A result for an older instance does not kill the new one.
        let newer = observed(vec![inst(&app, 0, State::Exited, 137, 0), inst(&app, 1, State::Running, 0, 40)]);
        assert_eq!(plan(&p, &newer, &pr, &mut Backoff::default(), 41), Plan::default());
    }

    #[test]
    fn a_changed_spec_restarts_even_under_never() {
        let app = container("app");
        let obs = observed(vec![inst(&app, 0, State::Running, 0, 0)]);
        let changed = Container { args: Some(vec!["--new".into()]), ..app };
        let p = pod("Never", vec![], vec![changed]);
        let got = plan(&p, &obs, &ProbeResults::default(), &mut Backoff::default(), 5);
        assert_eq!(got.kills[0].message, "Container app definition changed, will be restarted");
        assert_eq!(got.starts.len(), 1);
    }

    #[test]
    fn sidecars_start_in_order_gate_the_next_init_container_and_always_restart() {
        let side = with_probe(sidecar("side"), "startup");
        let i2 = container("i2");
        let app = container("app");
        let p = pod("Never", vec![side.clone(), i2.clone()], vec![app.clone()]);
        let mut pr = ProbeResults::default();
        pr.declare("side", ProbeKind::Startup);
        let mut b = Backoff::default();
        assert_eq!(names(&plan(&p, &observed(vec![]), &pr, &mut b, 0)), ["side"]);
        let side_running = inst(&side, 0, State::Running, 0, 0);
        let obs = observed(vec![side_running.clone()]);
        assert!(plan(&p, &obs, &pr, &mut b, 1).starts.is_empty(), "not started until its startup probe passes");
        pr.set("side", ProbeKind::Startup, Some("side-0"), Published::Success);
        assert_eq!(names(&plan(&p, &obs, &pr, &mut b, 2)), ["i2"]);
        let obs = observed(vec![side_running, inst(&i2, 0, State::Exited, 0, 2), inst(&app, 0, State::Running, 0, 4)]);
        assert_eq!(plan(&p, &obs, &pr, &mut b, 5), Plan::default());
        // The sidecar exits under a Never pod: it is restarted anyway, the app keeps running.
        let obs = observed(vec![
            inst(&side, 0, State::Exited, 1, 0),
            inst(&i2, 0, State::Exited, 0, 2),
            inst(&app, 0, State::Running, 0, 4),
        ]);
        assert_eq!(names(&plan(&p, &obs, &pr, &mut b, 6)), ["side"]);
        // The app completes: nothing more to run; the sidecar does not keep the pod alive.
        let obs = observed(vec![
            inst(&side, 1, State::Running, 0, 7),
            inst(&i2, 0, State::Exited, 0, 2),
            inst(&app, 0, State::Exited, 0, 4),
        ]);
        assert!(plan(&p, &obs, &pr, &mut b, 9).kill_pod);
    }

    #[test]
    fn a_dead_sandbox_is_replaced_unless_never_and_containers_ran() {
        let app = container("app");
        let mut obs = observed(vec![inst(&app, 0, State::Exited, 255, 0)]);
        obs.sandbox.as_mut().unwrap().ready = false;
        let got =
            plan(&pod("Always", vec![], vec![app.clone()]), &obs, &ProbeResults::default(), &mut Backoff::default(), 3);
        assert!(got.kill_pod && got.create_sandbox);
        assert_eq!(got.starts[0].restart_count, 1);
        let got = plan(&pod("Never", vec![], vec![app]), &obs, &ProbeResults::default(), &mut Backoff::default(), 3);
        assert!(got.kill_pod && !got.create_sandbox);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(go_duration(Duration::from_secs(3725)), "1h2m5s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(523)), "523ms");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(go_duration(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }
}
