//! The pod worker's sync loop against the fake runtime, on a paused clock: what it starts,
//! stops and waits for, and when.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ExecAction, Lifecycle, LifecycleHandler, Pod, Probe};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Node, PodHandle, Puller, StaticObjects, Update, spawn};
use crate::dns::NodeDns;
use crate::events::Memory;
use crate::fake::{Call, FakeRuntime, Script};
use crate::quantity::Quantity;
use crate::testutil::{container, pod};

struct Harness {
    rt: Arc<FakeRuntime>,
    events: Arc<Memory>,
    node: Arc<Node>,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new();
    let events = Arc::new(Memory::default());
    let node = Arc::new(Node {
        cri: rt.clone(),
        root: dir.path().join("kubelet"),
        node_name: "node-1".into(),
        host_ip: "192.0.2.1".into(),
        events: events.clone(),
        objects: Arc::new(StaticObjects::default()),
        dns: NodeDns { cluster_domain: "cluster.local".into(), ..Default::default() },
        allocatable_cpu: Quantity::parse("2").unwrap(),
        allocatable_memory: Quantity::parse("4Gi").unwrap(),
        runtime_events: broadcast::channel(1024).0,
        pulls: Puller::default(),
        memory_root: dir.path().join("memory"),
    });
    node.watch_runtime_events();
    Harness { rt, events, node, _dir: dir }
}

fn starts(rt: &FakeRuntime, name: &str) -> Vec<Instant> {
    rt.times(|c| matches!(c, Call::Start(n) if n == name))
}

/// Waits (on the paused clock) until `f` holds, for at most `limit`.
async fn until(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_until(h: &mut PodHandle, limit: Duration, what: &str, f: impl Fn(&Pod) -> bool) -> Pod {
    let found =
        tokio::time::timeout(limit, h.status.wait_for(|p| f(p))).await.ok().and_then(|r| r.ok().map(|p| p.clone()));
    found.unwrap_or_else(|| panic!("not within {limit:?}: {what}; status: {:?}", h.status.borrow().status))
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

fn waiting_reason(p: &Pod, name: &str) -> Option<String> {
    let s = p.status.as_ref()?.container_statuses.as_ref()?.iter().find(|c| c.name == name)?;
    s.state.as_ref()?.waiting.as_ref()?.reason.clone()
}

fn restarts(p: &Pod, name: &str) -> i32 {
    let s = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    s.and_then(|s| s.iter().find(|c| c.name == name)).map_or(-1, |c| c.restart_count)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_restarts_at_once_then_after_10_20_40_seconds() {
    let h = harness();
    h.rt.script("app", Script::Exit(1, Duration::from_secs(1)));
    let mut w = spawn(h.node.clone(), pod("Always", vec![], vec![container("app")]));
    until(Duration::from_secs(200), "five starts", || starts(&h.rt, "app").len() >= 5).await;
    let t = starts(&h.rt, "app");
    let gaps: Vec<f64> = t.windows(2).map(|w| secs(w[1] - w[0])).collect();
    // Each run lasts 1 s; the back-off counts from its finishedAt: 0, 10, 20, 40 s.
    for (gap, want) in gaps.iter().zip([1.0, 11.0, 21.0, 41.0]) {
        assert!((gap - want).abs() < 0.5, "restart gaps {gaps:?}, want 1, 11, 21, 41");
    }
    let p = status_until(&mut w, Duration::from_secs(5), "CrashLoopBackOff", |p| {
        waiting_reason(p, "app").as_deref() == Some("CrashLoopBackOff")
    })
    .await;
    assert_eq!(restarts(&p, "app"), 4);
    assert!(h.events.reasons().iter().any(|r| r == "BackOff"), "a BackOff event: {:?}", h.events.reasons());
    assert_eq!(h.rt.times(|c| *c == Call::RunSandbox).len(), 1, "one sandbox for all restarts");
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_one_after_another_before_the_app() {
    let h = harness();
    h.rt.script("init1", Script::Exit(0, Duration::from_secs(2)));
    h.rt.script("init2", Script::Exit(0, Duration::from_secs(3)));
    h.rt.add_image("app:1");
    let t0 = Instant::now();
    let mut w =
        spawn(h.node.clone(), pod("Always", vec![container("init1"), container("init2")], vec![container("app")]));
    let p = status_until(&mut w, Duration::from_secs(30), "Running", |p| phase(p) == "Running").await;
    let at = |n: &str| starts(&h.rt, n).first().map(|t| secs(*t - t0)).unwrap_or(f64::NAN);
    // Each starts when the one before it exits, woken by the runtime's event.
    assert!(at("init1") < 0.5, "init1 at {}", at("init1"));
    assert!((at("init2") - 2.0).abs() < 0.5, "init2 at {}", at("init2"));
    assert!((at("app") - 5.0).abs() < 0.5, "app at {}", at("app"));
    // IfNotPresent (a tagged image): only the images the runtime lacks are pulled.
    let pulls: Vec<Call> = h.rt.calls().into_iter().map(|l| l.call).filter(|c| matches!(c, Call::Pull(_))).collect();
    assert_eq!(pulls, [Call::Pull("init1:1".into()), Call::Pull("init2:1".into())]);
    let init = p.status.as_ref().and_then(|s| s.init_container_statuses.clone()).unwrap_or_default();
    assert!(
        init.iter().all(|s| s.state.as_ref().and_then(|s| s.terminated.as_ref()).is_some_and(|t| t.exit_code == 0))
    );
}

#[tokio::test(start_paused = true)]
async fn never_restarted_a_failed_container_fails_the_pod() {
    let h = harness();
    h.rt.script("app", Script::Exit(3, Duration::from_secs(1)));
    let mut w = spawn(h.node.clone(), pod("Never", vec![], vec![container("app")]));
    let p = status_until(&mut w, Duration::from_secs(30), "Failed", |p| phase(p) == "Failed").await;
    let s = p.status.unwrap().container_statuses.unwrap();
    assert_eq!(s[0].state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 3);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(starts(&h.rt, "app").len(), 1, "no restart under Never");
}

#[tokio::test(start_paused = true)]
async fn deletion_runs_pre_stop_then_stops_with_the_rest_of_the_grace_period_and_cleans_up() {
    let h = harness();
    let mut c = container("app");
    let drain = vec!["/bin/drain".to_string()];
    c.lifecycle = Some(Lifecycle {
        pre_stop: Some(LifecycleHandler {
            exec: Some(ExecAction { command: Some(drain.clone()) }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut p = pod("Always", vec![], vec![c]);
    p.spec.as_mut().unwrap().termination_grace_period_seconds = Some(20);
    let mut w = spawn(h.node.clone(), p);
    status_until(&mut w, Duration::from_secs(10), "Running", |p| phase(p) == "Running").await;
    w.updates.send(Update::Delete { grace: None }).unwrap();
    tokio::time::timeout(Duration::from_secs(60), w.task).await.expect("the worker ends").unwrap();
    let calls: Vec<Call> = h.rt.calls().into_iter().map(|l| l.call).collect();
    let i = |want: &Call| calls.iter().position(|c| c == want).unwrap_or_else(|| panic!("{want:?} in {calls:?}"));
    let exec = i(&Call::Exec("app".into(), drain));
    let stop = i(&Call::Stop("app".into(), 20));
    assert!(exec < stop && stop < i(&Call::StopSandbox) && i(&Call::StopSandbox) < i(&Call::RemoveSandbox));
    assert_eq!((h.rt.sandbox_count(), h.rt.container_count()), (0, 0), "nothing left in the runtime");
    assert!(!h.node.pod_dir("uid-1").exists(), "the pod's directory is removed");
    assert!(h.events.reasons().iter().any(|r| r == "Killing"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_liveness_probe_restarts_the_container_after_failure_threshold_periods() {
    let h = harness();
    let mut c = container("app");
    c.liveness_probe = Some(Probe {
        exec: Some(ExecAction { command: Some(vec!["/bin/check".into()]) }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Default::default()
    });
    h.rt.exec_code("app", 1);
    let mut w = spawn(h.node.clone(), pod("Always", vec![], vec![c]));
    let p = status_until(&mut w, Duration::from_secs(120), "one restart", |p| restarts(p, "app") == 1).await;
    assert_eq!(restarts(&p, "app"), 1);
    let started = starts(&h.rt, "app");
    let stopped = h.rt.times(|c| matches!(c, Call::Stop(n, _) if n == "app"));
    let after = secs(stopped[0] - started[0]);
    // Three failures, one period apart, the first at once.
    assert!((20.0..=31.0).contains(&after), "killed {after} s after the start");
    let events = h.events.events.lock().unwrap().clone();
    assert!(events.iter().filter(|e| e.reason == "Unhealthy").count() >= 3);
    assert!(
        events
            .iter()
            .any(|e| e.reason == "Killing" && e.message == "Container app failed liveness probe, will be restarted"),
        "{:?}",
        events.iter().map(|e| (&e.reason, &e.message)).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn active_deadline_ends_the_pod_as_failed_with_deadline_exceeded() {
    let h = harness();
    let mut p = pod("Always", vec![], vec![container("app")]);
    p.spec.as_mut().unwrap().active_deadline_seconds = Some(60);
    let t0 = Instant::now();
    let mut w = spawn(h.node.clone(), p);
    let p = status_until(&mut w, Duration::from_secs(120), "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(p.status.unwrap().reason.as_deref(), Some("DeadlineExceeded"));
    let stopped = h.rt.times(|c| matches!(c, Call::Stop(n, _) if n == "app"));
    assert!((secs(stopped[0] - t0) - 60.0).abs() < 1.0, "stopped at {}", secs(stopped[0] - t0));
    assert!(h.events.reasons().iter().any(|r| r == "DeadlineExceeded"));
}

#[tokio::test(start_paused = true)]
async fn a_new_worker_adopts_the_running_pod_without_a_second_sandbox() {
    let h = harness();
    let p = pod("Always", vec![], vec![container("app")]);
    let mut first = spawn(h.node.clone(), p.clone());
    status_until(&mut first, Duration::from_secs(10), "Running", |p| phase(p) == "Running").await;
    // The kubelet side restarts: its worker is gone, the runtime's pod is not.
    first.task.abort();
    let mut second = spawn(h.node.clone(), p);
    let p = status_until(&mut second, Duration::from_secs(10), "Running", |p| phase(p) == "Running").await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.rt.times(|c| *c == Call::RunSandbox).len(), 1);
    assert_eq!(starts(&h.rt, "app").len(), 1, "the running container is kept");
    assert_eq!(restarts(&p, "app"), 0);
}
