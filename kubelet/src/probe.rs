//! Probe timing and the probe worker's state machine (`pkg/kubelet/prober/worker.go`), pure:
//! the worker loop feeds it what it sees of the container and the raw results of each run, and
//! it says whether to run and what result to publish.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Probe;

/// The three probe types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    /// As events and messages spell it ("Liveness probe failed: ...").
    pub fn title(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Startup => "Startup",
        }
    }
}

/// A probe's (or a hook's) result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Success, with a warning event (`ProbeWarning`), e.g. a redirect to another host.
    Warning,
    Failure,
    /// The probe could not run (an error, not a failure): retried.
    Unknown,
}

/// The published result of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Success,
    Failure,
    Unknown,
}

/// A probe's timing with the API server's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    /// Probe-level terminationGracePeriodSeconds (liveness and startup only).
    pub termination_grace: Option<i64>,
}

fn positive(v: Option<i32>, default: i32) -> u32 {
    // Zero means unset: the defaulting code treats 0 as absent.
    match v {
        Some(n) if n > 0 => n as u32,
        _ => default as u32,
    }
}

impl Timing {
    /// Defaults: initialDelaySeconds 0, periodSeconds 10, timeoutSeconds 1, successThreshold 1,
    /// failureThreshold 3.
    pub fn of(p: &Probe, kind: ProbeKind) -> Timing {
        let success = match kind {
            // Must be 1 for liveness and startup (validation refuses anything else).
            ProbeKind::Liveness | ProbeKind::Startup => 1,
            ProbeKind::Readiness => positive(p.success_threshold, 1),
        };
        Timing {
            initial_delay: Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64),
            period: Duration::from_secs(u64::from(positive(p.period_seconds, 10))),
            timeout: Duration::from_secs(u64::from(positive(p.timeout_seconds, 1))),
            success_threshold: success,
            failure_threshold: positive(p.failure_threshold, 3),
            termination_grace: match kind {
                ProbeKind::Readiness => None,
                _ => p.termination_grace_period_seconds,
            },
        }
    }
}

/// What the worker sees of its container at a tick.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The container's current ID (none before its first start).
    pub id: Option<String>,
    /// When it started, if it is running.
    pub running_since: Option<SystemTime>,
    /// Whether its latest instance has terminated.
    pub terminated: bool,
    /// The kubelet's `started` (running, and the startup probe has passed or there is none).
    pub started: bool,
    /// The pod has a deletion timestamp.
    pub deleting: bool,
    /// The pod's restartPolicy is Never (a terminated container will not come back).
    pub restart_never: bool,
    /// The pod reached a terminal phase.
    pub pod_terminal: bool,
}

/// What the worker does at a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to run this period.
    Skip,
    /// Run the probe now.
    Run,
    /// The worker ends.
    Stop,
}

/// One probe worker's state: (container, probe type).
#[derive(Debug, Clone)]
pub struct Worker {
    pub kind: ProbeKind,
    pub timing: Timing,
    container_id: Option<String>,
    /// Set after a liveness/startup failure: no probing until a new container ID.
    on_hold: bool,
    last_raw: Option<Published>,
    run: u32,
    published: Published,
}

impl Worker {
    pub fn new(kind: ProbeKind, timing: Timing) -> Worker {
        Worker {
            kind,
            timing,
            container_id: None,
            on_hold: false,
            last_raw: None,
            run: 0,
            published: Self::initial(kind),
        }
    }

    /// The value a new container ID starts with: readiness Failure, liveness Success, startup
    /// Unknown.
    pub fn initial(kind: ProbeKind) -> Published {
        match kind {
            ProbeKind::Readiness => Published::Failure,
            ProbeKind::Liveness => Published::Success,
            ProbeKind::Startup => Published::Unknown,
        }
    }

    /// The result the pod worker sees.
    pub fn published(&self) -> Published {
        self.published
    }

    /// The container this result is for.
    pub fn container_id(&self) -> Option<&str> {
        self.container_id.as_deref()
    }

    fn publish(&mut self, r: Published) -> bool {
        let changed = self.published != r;
        self.published = r;
        changed
    }

    /// Decides the tick from what is seen. May change the published result (the bool says so):
    /// a new container ID resets it, a non-running container reads as Failure, deletion
    /// records Success for liveness and startup.
    pub fn tick(&mut self, seen: &Seen, now: SystemTime) -> (Tick, bool) {
        let mut changed = false;
        if seen.pod_terminal {
            return (Tick::Stop, false);
        }
        if seen.deleting && self.kind != ProbeKind::Readiness {
            return (Tick::Stop, self.publish(Published::Success));
        }
        let Some(id) = seen.id.as_deref() else { return (Tick::Skip, false) };
        if self.container_id.as_deref() != Some(id) {
            self.container_id = Some(id.to_string());
            self.on_hold = false;
            self.last_raw = None;
            self.run = 0;
            changed |= self.publish(Self::initial(self.kind));
        }
        if self.on_hold {
            return (Tick::Skip, changed);
        }
        let Some(since) = seen.running_since else {
            changed |= self.publish(Published::Failure);
            // A terminated container under Never never comes back: the worker ends.
            let tick = if seen.terminated && seen.restart_never { Tick::Stop } else { Tick::Skip };
            return (tick, changed);
        };
        if now.duration_since(since).unwrap_or_default().as_secs() < self.timing.initial_delay.as_secs() {
            return (Tick::Skip, changed);
        }
        // Until the container has started only the startup probe runs; after, only the others.
        let wanted = match self.kind {
            ProbeKind::Startup => !seen.started,
            _ => seen.started,
        };
        (if wanted { Tick::Run } else { Tick::Skip }, changed)
    }

    /// Records a run's outcome; returns true when the published result changed. Failures and
    /// successes count only after failureThreshold / successThreshold identical results in a
    /// row; an Unknown outcome (an error after retries) changes nothing.
    pub fn record(&mut self, outcome: Outcome) -> bool {
        let raw = match outcome {
            Outcome::Success | Outcome::Warning => Published::Success,
            Outcome::Failure => Published::Failure,
            Outcome::Unknown => return false,
        };
        if self.last_raw == Some(raw) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last_raw = Some(raw);
            self.run = 1;
        }
        let threshold = match raw {
            Published::Failure => self.timing.failure_threshold,
            _ => self.timing.success_threshold,
        };
        if self.run < threshold {
            return false;
        }
        let changed = self.publish(raw);
        if raw == Published::Failure && self.kind != ProbeKind::Readiness {
            // The container will be restarted: stop probing until its new ID shows up.
            self.on_hold = true;
            self.run = 0;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + secs)
    }

    fn running(id: &str, since: u64, started: bool) -> Seen {
        Seen { id: Some(id.into()), running_since: Some(t(since)), started, ..Default::default() }
    }

    #[test]
    fn defaults_apply_to_zero_and_absent_fields() {
        let p = Probe::default();
        let tm = Timing::of(&p, ProbeKind::Readiness);
        assert_eq!(tm.initial_delay, Duration::ZERO);
        assert_eq!(tm.period, Duration::from_secs(10));
        assert_eq!(tm.timeout, Duration::from_secs(1));
        assert_eq!((tm.success_threshold, tm.failure_threshold), (1, 3));
        let p = Probe {
            period_seconds: Some(0),
            timeout_seconds: Some(0),
            failure_threshold: Some(0),
            success_threshold: Some(3),
            termination_grace_period_seconds: Some(5),
            ..Default::default()
        };
        let r = Timing::of(&p, ProbeKind::Readiness);
        assert_eq!((r.period.as_secs(), r.timeout.as_secs(), r.failure_threshold), (10, 1, 3));
        assert_eq!(r.success_threshold, 3);
        assert_eq!(r.termination_grace, None, "readiness has no probe-level grace");
        let l = Timing::of(&p, ProbeKind::Liveness);
        assert_eq!(l.success_threshold, 1);
        assert_eq!(l.termination_grace, Some(5));
    }

    #[test]
    fn initial_values_per_kind() {
        assert_eq!(Worker::initial(ProbeKind::Readiness), Published::Failure);
        assert_eq!(Worker::initial(ProbeKind::Liveness), Published::Success);
        assert_eq!(Worker::initial(ProbeKind::Startup), Published::Unknown);
    }

    #[test]
    fn failure_counts_only_after_the_threshold_and_then_holds() {
        let tm = Timing::of(&Probe::default(), ProbeKind::Liveness);
        let mut w = Worker::new(ProbeKind::Liveness, tm);
        assert_eq!(w.tick(&running("c1", 0, true), t(1)).0, Tick::Run);
        assert!(!w.record(Outcome::Failure));
        assert!(!w.record(Outcome::Failure));
        // A success in between restarts the count.
        assert!(!w.record(Outcome::Success));
        assert!(!w.record(Outcome::Failure));
        assert!(!w.record(Outcome::Failure));
        assert!(!w.record(Outcome::Unknown), "errors do not count");
        assert!(w.record(Outcome::Failure), "third failure in a row publishes Failure");
        assert_eq!(w.published(), Published::Failure);
        // On hold until the container is replaced.
        assert_eq!(w.tick(&running("c1", 0, true), t(30)).0, Tick::Skip);
        let (tick, changed) = w.tick(&running("c2", 31, true), t(31));
        assert_eq!(tick, Tick::Run);
        assert!(changed, "a new container ID resets to the initial value");
        assert_eq!(w.published(), Published::Success);
    }

    #[test]
    fn readiness_needs_success_threshold_and_toggles_both_ways() {
        let p = Probe { success_threshold: Some(2), failure_threshold: Some(1), ..Default::default() };
        let mut w = Worker::new(ProbeKind::Readiness, Timing::of(&p, ProbeKind::Readiness));
        let (_, changed) = w.tick(&running("c1", 0, true), t(0));
        assert!(!changed, "readiness starts at Failure");
        assert!(!w.record(Outcome::Success));
        assert!(w.record(Outcome::Warning), "a warning counts as success");
        assert_eq!(w.published(), Published::Success);
        assert!(w.record(Outcome::Failure));
        assert_eq!(w.published(), Published::Failure);
        // Readiness keeps probing after a failure.
        assert_eq!(w.tick(&running("c1", 0, true), t(5)).0, Tick::Run);
    }

    #[test]
    fn gating_by_initial_delay_and_startup() {
        let p = Probe { initial_delay_seconds: Some(5), ..Default::default() };
        let mut live = Worker::new(ProbeKind::Liveness, Timing::of(&p, ProbeKind::Liveness));
        let mut startup = Worker::new(ProbeKind::Startup, Timing::of(&Probe::default(), ProbeKind::Startup));
        // Not started yet: only the startup probe runs, and liveness waits its delay.
        assert_eq!(live.tick(&running("c", 0, false), t(10)).0, Tick::Skip);
        assert_eq!(startup.tick(&running("c", 0, false), t(0)).0, Tick::Run);
        assert!(startup.record(Outcome::Success));
        // Started: startup stops running, liveness runs once its delay is over.
        assert_eq!(startup.tick(&running("c", 0, true), t(1)).0, Tick::Skip);
        assert_eq!(live.tick(&running("c", 0, true), t(4)).0, Tick::Skip);
        assert_eq!(live.tick(&running("c", 0, true), t(5)).0, Tick::Run);
    }

    #[test]
    fn not_running_reads_failure_and_deletion_stops_liveness_with_success() {
        let mut r = Worker::new(ProbeKind::Readiness, Timing::of(&Probe::default(), ProbeKind::Readiness));
        r.tick(&running("c", 0, true), t(0));
        r.record(Outcome::Success);
        let exited = Seen { id: Some("c".into()), terminated: true, ..Default::default() };
        let (tick, changed) = r.tick(&exited, t(1));
        assert_eq!((tick, changed, r.published()), (Tick::Skip, true, Published::Failure));
        let never = Seen { restart_never: true, ..exited };
        assert_eq!(r.tick(&never, t(2)).0, Tick::Stop);

        let mut l = Worker::new(ProbeKind::Liveness, Timing::of(&Probe::default(), ProbeKind::Liveness));
        l.tick(&running("c", 0, true), t(0));
        for _ in 0..2 {
            l.record(Outcome::Failure);
        }
        let deleting = Seen { deleting: true, ..running("c", 0, true) };
        assert_eq!(l.tick(&deleting, t(1)).0, Tick::Stop);
        assert_eq!(l.published(), Published::Success);
        // Readiness keeps running during deletion.
        r.tick(&running("c2", 0, true), t(3));
        assert_eq!(r.tick(&Seen { deleting: true, ..running("c2", 0, true) }, t(4)).0, Tick::Run);
    }
}
