//! The kubelet's Prometheus metrics under the kubelet's names, as the node API serves them
//! (`/metrics`, and `/metrics/probes` for the prober's). Counters and histograms are recorded
//! where things happen (CRI calls, pod workers, probes) into one registry for the process, as
//! the kubelet's are; what runs now (pods, containers) is counted from the CRI at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, help text, kind and (histograms) bucket bounds in seconds.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub buckets: &'static [f64],
}

/// Bounds for things that take milliseconds to minutes (wasm pods start in milliseconds).
const SECONDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub static STARTED_PODS: Def = Def {
    name: "kubelet_started_pods_total",
    help: "[ALPHA] Pod sandboxes the kubelet has run.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static STARTED_PODS_ERRORS: Def = Def {
    name: "kubelet_started_pods_errors_total",
    help: "[ALPHA] Pod sandboxes that failed to run.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static STARTED_CONTAINERS: Def = Def {
    name: "kubelet_started_containers_total",
    help: "[ALPHA] Containers the kubelet has started, by container_type.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static POD_START: Def = Def {
    name: "kubelet_pod_start_duration_seconds",
    help: "[ALPHA] From the kubelet first seeing a pod to the pod running.",
    kind: Kind::Histogram,
    buckets: SECONDS,
};
pub static POD_START_SLI: Def = Def {
    name: "kubelet_pod_start_sli_duration_seconds",
    help: "[BETA] From the kubelet first seeing a pod to the pod running, image pulls left out.",
    kind: Kind::Histogram,
    buckets: SECONDS,
};
pub static RUNTIME_OPERATIONS: Def = Def {
    name: "kubelet_runtime_operations_total",
    help: "[ALPHA] CRI calls, by operation_type.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static RUNTIME_OPERATIONS_ERRORS: Def = Def {
    name: "kubelet_runtime_operations_errors_total",
    help: "[ALPHA] CRI calls that failed, by operation_type.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static RUNTIME_OPERATIONS_DURATION: Def = Def {
    name: "kubelet_runtime_operations_duration_seconds",
    help: "[ALPHA] How long CRI calls take, by operation_type.",
    kind: Kind::Histogram,
    buckets: SECONDS,
};
pub static RUNNING_PODS: Def =
    Def { name: "kubelet_running_pods", help: "[ALPHA] Pods with a ready sandbox.", kind: Kind::Gauge, buckets: &[] };
pub static RUNNING_CONTAINERS: Def = Def {
    name: "kubelet_running_containers",
    help: "[ALPHA] Containers, by container_state.",
    kind: Kind::Gauge,
    buckets: &[],
};
pub static NODE_NAME: Def = Def {
    name: "kubelet_node_name",
    help: "[ALPHA] The node's name; the value is always 1.",
    kind: Kind::Gauge,
    buckets: &[],
};
pub static PROBES: Def = Def {
    name: "prober_probe_total",
    help: "[ALPHA] Liveness, readiness and startup probes run, by result.",
    kind: Kind::Counter,
    buckets: &[],
};
pub static PROBE_DURATION: Def = Def {
    name: "prober_probe_duration_seconds",
    help: "[ALPHA] How long probes take, by probe_type and result.",
    kind: Kind::Histogram,
    buckets: SECONDS,
};

/// The recorded metrics of `/metrics`, in the order they are shown (gauges come from the
/// scrape itself).
pub const KUBELET: &[&Def] = &[
    &STARTED_PODS,
    &STARTED_PODS_ERRORS,
    &STARTED_CONTAINERS,
    &POD_START,
    &POD_START_SLI,
    &RUNTIME_OPERATIONS,
    &RUNTIME_OPERATIONS_ERRORS,
    &RUNTIME_OPERATIONS_DURATION,
];

/// The recorded metrics of `/metrics/probes`.
pub const PROBER: &[&Def] = &[&PROBES, &PROBE_DURATION];

type Labels = Vec<(&'static str, String)>;

enum Series {
    Value(f64),
    /// Per-bucket counts (not cumulative), the sum and the count.
    Histogram(Vec<u64>, f64, u64),
}

/// Every recorded series, by metric name and labels.
static REGISTRY: LazyLock<Mutex<BTreeMap<&'static str, BTreeMap<Labels, Series>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn with_series(def: &'static Def, l: &[(&'static str, &str)], f: impl FnOnce(&mut Series)) {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let series = reg.entry(def.name).or_default().entry(labels(l)).or_insert_with(|| match def.kind {
        Kind::Histogram => Series::Histogram(vec![0; def.buckets.len()], 0.0, 0),
        _ => Series::Value(0.0),
    });
    f(series);
}

/// Adds one to a counter.
pub fn inc(def: &'static Def, l: &[(&'static str, &str)]) {
    with_series(def, l, |s| {
        if let Series::Value(v) = s {
            *v += 1.0;
        }
    });
}

/// Records a duration in a histogram.
pub fn observe(def: &'static Def, l: &[(&'static str, &str)], d: Duration) {
    let secs = d.as_secs_f64();
    with_series(def, l, |s| {
        if let Series::Histogram(counts, sum, count) = s {
            if let Some(i) = def.buckets.iter().position(|b| secs <= *b) {
                counts[i] += 1;
            }
            *sum += secs;
            *count += 1;
        }
    });
}

/// A value read at scrape time.
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// The Prometheus text format of the recorded metrics `defs`, then of `gauges`.
pub fn render(defs: &[&'static Def], gauges: &[(&'static Def, Vec<Sample>)]) -> String {
    let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::new();
    for def in defs {
        let Some(all) = reg.get(def.name).filter(|s| !s.is_empty()) else { continue };
        header(&mut out, def);
        for (l, series) in all {
            match series {
                Series::Value(v) => line(&mut out, def.name, "", l, None, *v),
                Series::Histogram(counts, sum, count) => {
                    let mut cumulative = 0;
                    for (bound, n) in def.buckets.iter().zip(counts) {
                        cumulative += n;
                        line(&mut out, def.name, "_bucket", l, Some(&bound.to_string()), cumulative as f64);
                    }
                    line(&mut out, def.name, "_bucket", l, Some("+Inf"), *count as f64);
                    line(&mut out, def.name, "_sum", l, None, *sum);
                    line(&mut out, def.name, "_count", l, None, *count as f64);
                }
            }
        }
    }
    for (def, samples) in gauges {
        header(&mut out, def);
        for s in samples {
            line(&mut out, def.name, "", &s.labels, None, s.value);
        }
    }
    out
}

fn header(out: &mut String, def: &Def) {
    let kind = match def.kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    };
    let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {kind}", def.name, def.help, def.name);
}

fn line(out: &mut String, name: &str, suffix: &str, l: &Labels, le: Option<&str>, value: f64) {
    out.push_str(name);
    out.push_str(suffix);
    if !l.is_empty() || le.is_some() {
        let mut parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        if let Some(le) = le {
            parts.push(format!("le=\"{le}\""));
        }
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
    let _ = writeln!(out, " {value}");
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The kubelet's operation_type for a CRI method path (`/runtime.v1.RuntimeService/
/// RunPodSandbox` is `run_podsandbox`).
pub fn operation_type(path: &str) -> String {
    let method = path.rsplit('/').next().unwrap_or(path);
    let mut snake = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake.replace("pod_sandbox", "podsandbox")
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_COUNTER: Def = Def { name: "test_total", help: "h", kind: Kind::Counter, buckets: &[] };
    static TEST_HISTOGRAM: Def = Def { name: "test_seconds", help: "h", kind: Kind::Histogram, buckets: &[0.1, 1.0] };

    #[test]
    fn counters_histograms_and_gauges_in_the_text_format() {
        inc(&TEST_COUNTER, &[("kind", "a\"b")]);
        inc(&TEST_COUNTER, &[("kind", "a\"b")]);
        observe(&TEST_HISTOGRAM, &[], Duration::from_micros(62_500));
        observe(&TEST_HISTOGRAM, &[], Duration::from_millis(500));
        observe(&TEST_HISTOGRAM, &[], Duration::from_secs(4));
        let text =
            render(&[&TEST_COUNTER, &TEST_HISTOGRAM], &[(&RUNNING_PODS, vec![Sample { labels: vec![], value: 2.0 }])]);
        assert_eq!(
            text,
            "# HELP test_total h\n# TYPE test_total counter\ntest_total{kind=\"a\\\"b\"} 2\n\
             # HELP test_seconds h\n# TYPE test_seconds histogram\n\
             test_seconds_bucket{le=\"0.1\"} 1\ntest_seconds_bucket{le=\"1\"} 2\ntest_seconds_bucket{le=\"+Inf\"} 3\n\
             test_seconds_sum 4.5625\ntest_seconds_count 3\n\
             # HELP kubelet_running_pods [ALPHA] Pods with a ready sandbox.\n# TYPE kubelet_running_pods gauge\n\
             kubelet_running_pods 2\n"
        );
    }

    #[test]
    fn operation_types_as_the_kubelet_names_them() {
        assert_eq!(operation_type("/runtime.v1.RuntimeService/RunPodSandbox"), "run_podsandbox");
        assert_eq!(operation_type("/runtime.v1.RuntimeService/ListPodSandbox"), "list_podsandbox");
        assert_eq!(operation_type("/runtime.v1.RuntimeService/PodSandboxStatus"), "podsandbox_status");
        assert_eq!(operation_type("/runtime.v1.RuntimeService/CreateContainer"), "create_container");
        assert_eq!(operation_type("/runtime.v1.ImageService/PullImage"), "pull_image");
        assert_eq!(operation_type("/runtime.v1.RuntimeService/ExecSync"), "exec_sync");
    }
}
