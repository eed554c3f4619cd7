//! Pod startup on a `wasmlet node` in a real cluster (run by `bash bench/node-start.sh`, which
//! builds the release binary first), measured as the Kubernetes pod startup SLI does: from a
//! pod's creation to its Running, as observed through a watch, with the image already on the
//! node. p50/p99 over the pods of a 100-replica Deployment created at once, and over pods
//! created one after another; the node's RSS idle, with 100 pods and with PODS pods. The
//! control plane (etcd, apiserver, controller-manager, scheduler) runs on the same machine.

use std::collections::HashMap;
use std::io::BufReader;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmlet_tests::cluster::{ControlPlane, WasmletNode};
use wasmlet_tests::{examples_dir, rss_mib};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Per pod name: when the watch first saw it, and when it first saw it Running.
type Seen = Arc<Mutex<HashMap<String, (Instant, Option<Instant>)>>>;

/// Follows `kubectl get pods -w` in the namespace and notes the times.
fn watch(cp: &ControlPlane, ns: &str) -> Seen {
    let seen: Seen = Arc::default();
    let mut child = Command::new(cp.bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&cp.admin)
        .args(["get", "pods", "-n", ns, "-w", "--output-watch-events", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl watch");
    let out = child.stdout.take().unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        let _child = child;
        for event in serde_json::Deserializer::from_reader(BufReader::new(out)).into_iter::<Value>().flatten() {
            let now = Instant::now();
            let pod = &event["object"];
            let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let running = pod["status"]["phase"] == "Running";
            let mut s = s.lock().unwrap();
            let entry = s.entry(name).or_insert((now, None));
            if running && entry.1.is_none() {
                entry.1 = Some(now);
            }
        }
    });
    seen
}

fn startup_ms(seen: &Seen, prefix: &str) -> Vec<f64> {
    let mut v: Vec<f64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .filter_map(|(_, (first, running))| running.map(|r| r.duration_since(*first).as_secs_f64() * 1000.0))
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[(((v.len() as f64) * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn wait_running(seen: &Seen, prefix: &str, n: usize, limit: Duration) {
    let end = Instant::now() + limit;
    while startup_ms(seen, prefix).len() < n {
        assert!(Instant::now() < end, "{n} pods {prefix}* not Running within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deployment(name: &str, node: &str, replicas: u64) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      runtimeClassName: wasmlet\n      nodeSelector: {{kubernetes.io/hostname: {node}}}\n      automountServiceAccountToken: false\n      enableServiceLinks: false\n      containers: [{{name: web, image: \"web:1\", imagePullPolicy: IfNotPresent}}]\n"
    )
}

fn main() {
    let Some(cp) = ControlPlane::shared() else { return };
    let pods = env("PODS", 1000);
    let sequential = env("SEQUENTIAL", 30);
    let config = format!("[node]\nmaxPods = {}\n", pods + 10);
    let node = WasmletNode::start(cp, "bench-node", &[(&examples_dir().join("web.wat"), "web:1")], &config).unwrap();
    cp.wait("the node Ready", Duration::from_secs(60), || {
        Ok(cp.kubectl_ok(&["get", "node", "bench-node"]).map(|t| t.contains(" Ready ")).unwrap_or(false))
    })
    .unwrap();
    let pid = node.pid().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let idle = rss_mib(pid);
    let ns = cp.namespace("bench").unwrap();
    let seen = watch(cp, &ns);
    std::thread::sleep(Duration::from_secs(1));

    cp.apply(&ns, &deployment("burst", &node.name, 100)).unwrap();
    wait_running(&seen, "burst-", 100, Duration::from_secs(300));
    let burst = startup_ms(&seen, "burst-");
    std::thread::sleep(Duration::from_secs(5));
    let rss_100 = rss_mib(pid);

    // One after another: each pod created once the one before runs.
    for i in 0..sequential {
        let name = format!("one-{i}");
        cp.apply(
            &ns,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: wasmlet\n  nodeSelector: {{kubernetes.io/hostname: {}}}\n  automountServiceAccountToken: false\n  enableServiceLinks: false\n  containers: [{{name: web, image: \"web:1\", imagePullPolicy: IfNotPresent}}]\n",
                node.name
            ),
        )
        .unwrap();
        wait_running(&seen, &name, 1, Duration::from_secs(60));
    }
    let one = startup_ms(&seen, "one-");

    let rss_many = if pods > 100 {
        cp.kubectl_ok(&["scale", "-n", &ns, "deployment/burst", &format!("--replicas={}", pods - sequential)]).unwrap();
        wait_running(&seen, "burst-", (pods - sequential) as usize, Duration::from_secs(1200));
        std::thread::sleep(Duration::from_secs(10));
        rss_mib(pid)
    } else {
        rss_100
    };
    println!("pod startup (creation to Running, through a watch; SLO: p99 <= 5 s)");
    println!(
        "  100-replica Deployment: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(&burst, 0.5),
        pct(&burst, 0.99),
        pct(&burst, 1.0)
    );
    println!("  {} pods one after another: p50 {:.0} ms, p99 {:.0} ms", one.len(), pct(&one, 0.5), pct(&one, 0.99));
    println!(
        "node RSS: idle {idle:.1} MiB, with 100 pods {rss_100:.1} MiB, with {pods} pods {rss_many:.1} MiB (the kubelet's density test allows 100 MiB with 50 pods)"
    );
}
