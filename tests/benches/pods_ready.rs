//! Pod workers at work (run by `bash bench/pods-ready.sh`, which builds the release binary
//! first): how long `wasmlet run` takes from its start to a pod Ready (an HTTP server,
//! `workloads/http.c`, with a readiness probe every second), and how much CPU one wasmlet
//! spends keeping PODS such pods Ready with their probes running, against the same pods
//! without probes, in the same run.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasmlet_tests::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn manifest(pods: u64, probe: bool) -> String {
    (0..pods)
        .map(|i| {
            let probe = if probe { "    readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}\n" } else { "" };
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}}}\nspec:\n  containers:\n  - name: web\n    image: \"http:1\"\n    ports: [{{containerPort: 8080}}]\n{probe}"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Starts `wasmlet run` on `manifest`; returns the child and its stdout lines.
fn start(dir: &Path, manifest: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let file = dir.join("pods.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut child = Command::new(wasmlet_bin())
        .arg("run")
        .arg(&file)
        .arg("--config")
        .arg(dir.join("wasmlet.toml"))
        .arg("--root")
        .arg(dir.join("root"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// Waits until `n` pods have printed a `1/1 Running` line.
fn wait_ready(rx: &std::sync::mpsc::Receiver<String>, n: usize, limit: Duration) {
    let mut ready = HashSet::new();
    let end = Instant::now() + limit;
    while ready.len() < n {
        let l = rx.recv_timeout(end.saturating_duration_since(Instant::now())).expect("pods ready in time");
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 5 && f[1] == "1/1" && f[2] == "Running" {
            ready.insert(f[0].to_string());
        }
    }
}

fn stop(mut child: Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    let _ = child.wait();
}

/// CPU seconds (user + system) so far of a process's threads: the runtime's (named "wasm...":
/// its CRI server, the guests and what serves them) and the kubelet's (the rest: pod workers,
/// the probers' thread).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let (mut runtime, mut kubelet) = (0.0, 0.0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("stat")))
        else {
            continue; // a thread that ended meanwhile
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let secs = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0;
        if comm.starts_with("wasm") { runtime += secs } else { kubelet += secs }
    }
    (runtime, kubelet)
}

/// CPU cores used over `window` by the runtime's threads and by the kubelet's, and the
/// resident memory at the end.
fn measure(child: &Child, window: Duration) -> (f64, f64, f64) {
    let a = cpu_seconds(child.id());
    std::thread::sleep(window);
    let b = cpu_seconds(child.id());
    let w = window.as_secs_f64();
    ((b.0 - a.0) / w, (b.1 - a.1) / w, rss_mib(child.id()))
}

fn main() {
    let pods = env("PODS", 1000);
    let runs = env("RUNS", 20);
    let window = Duration::from_secs(env("WINDOW_SECONDS", 30));
    let dir = tempfile::tempdir().unwrap();
    let run_dir = format!("/dev/shm/wasmlet-bench-ready-{}", std::process::id());
    std::fs::write(dir.path().join("wasmlet.toml"), format!("run_dir = {run_dir:?}\n")).unwrap();
    let out = Command::new(wasmlet_bin())
        .args(["image", "import"])
        .arg(http_component())
        .args(["--tag", "http:1", "--root"])
        .arg(dir.path().join("root"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // 1. `wasmlet run` to Ready, one pod, RUNS times (the first run, which compiles, is not
    // counted).
    let one = manifest(1, true);
    let mut times = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        let (child, rx) = start(dir.path(), &one);
        wait_ready(&rx, 1, Duration::from_secs(60));
        let took = t0.elapsed();
        stop(child);
        if i > 0 {
            times.push(took.as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "wasmlet run -> pod Ready (HTTP server, readiness probe periodSeconds 1), {runs} runs: min {:.1} ms, median {:.1} ms, p90 {:.1} ms",
        times[0],
        pct(0.5),
        pct(0.9)
    );

    // 2. PODS pods kept Ready, with and without their probes.
    let mut cores = Vec::new();
    for probe in [true, false] {
        let t0 = Instant::now();
        let (child, rx) = start(dir.path(), &manifest(pods, probe));
        wait_ready(&rx, pods as usize, Duration::from_secs(600));
        let all_ready = t0.elapsed();
        // Let the start-up settle, then measure.
        std::thread::sleep(Duration::from_secs(5));
        let (runtime, kubelet, rss) = measure(&child, window);
        println!(
            "{pods} pods {}: all Ready after {:.1} s; then {:.1}% of one core over {} s (kubelet threads {:.1}%, runtime threads {:.1}%), RSS {:.0} MiB ({:.1} KiB per pod)",
            if probe { "with a readiness probe each (periodSeconds 1)" } else { "without probes" },
            all_ready.as_secs_f64(),
            (runtime + kubelet) * 100.0,
            window.as_secs(),
            kubelet * 100.0,
            runtime * 100.0,
            rss,
            rss * 1024.0 / pods as f64
        );
        cores.push((kubelet, runtime));
        stop(child);
    }
    let (with, without) = (cores[0], cores[1]);
    println!(
        "probing {pods} pods every second: {:.1}% of one core in all; the kubelet's side (probers) {:.1}%, the pods answering (runtime) {:.1}%",
        (with.0 + with.1 - without.0 - without.1) * 100.0,
        (with.0 - without.0) * 100.0,
        (with.1 - without.1) * 100.0
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}
