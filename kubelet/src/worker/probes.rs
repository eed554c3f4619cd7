//! Probe tasks: one per (container, probe type), fed what their container looks like and
//! publishing results that wake the worker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::sync::{Notify, watch};

use super::{Worker, field_path, lock};
use crate::clock;
use crate::cri::Runtime;
use crate::events::{Event, Kind, Recorder};
use crate::model::{self, Observed, ProbeResults, State};
use crate::probe::{self, Outcome, ProbeKind, Seen, Tick, Timing};
use crate::prober::{self, Target};

/// What a probe task sees of its container.
#[derive(Debug, Clone, Default)]
pub(super) struct View {
    seen: Seen,
    target: Target,
}

impl Worker {
    /// Starts the probe tasks of a container that has probes (once).
    pub(super) fn ensure_probes(&mut self, c: &Container) {
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
    pub(super) fn update_views(&mut self, observed: &Observed) {
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
    cri: Runtime,
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
            let now = clock::now();
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
                    let started = std::time::Instant::now();
                    let (outcome, output) = self.run_with_retries(&view.target, timing.timeout).await;
                    self.count(outcome, started.elapsed());
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

    /// prober_probe_total and prober_probe_duration_seconds, labelled as the kubelet's.
    fn count(&self, outcome: Outcome, took: Duration) {
        let (ns, pod, uid, _) = &self.pod;
        let result = match outcome {
            Outcome::Success | Outcome::Warning => "successful",
            Outcome::Failure => "failed",
            Outcome::Unknown => "unknown",
        };
        let probe_type = self.kind.title();
        let base =
            [("probe_type", probe_type), ("container", self.container.name.as_str()), ("pod", pod), ("namespace", ns)];
        crate::metrics::observe(&crate::metrics::PROBE_DURATION, &base, took);
        let mut all = base.to_vec();
        all.extend([("result", result), ("pod_uid", uid.as_str())]);
        crate::metrics::inc(&crate::metrics::PROBES, &all);
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
            time: clock::now(),
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
            prober::exec(self.cri.as_ref(), target, e, c, timeout).await
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
