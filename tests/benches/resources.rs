//! Resources benchmark (run by `bash bench/resources.sh`, which builds the release binary
//! first), against one `wasmlet cri`, in one run:
//! - the p50/p99 latency of GET requests to a light wasi:http pod on an idle node, then while
//!   10 CPU-bound pods (`tool loop`) run beside it with limits.cpu 100m each, then without
//!   limits;
//! - the cost of one ListContainerStats and one ListPodSandboxStats call, and one
//!   ContainerStats call, with PODS pods (default 1,000) on the node.

use std::time::{Duration, Instant};

use wasmlet_tests::*;

/// Latencies of `n` GETs, one after another, after 50 warm-up ones.
fn latencies(port: u16, n: usize) -> Vec<Duration> {
    for _ in 0..50 {
        http_get(port, "/ping").unwrap();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let a = http_get(port, "/ping").unwrap();
            assert!(a.starts_with("HTTP/1.0 200"), "{a}");
            t.elapsed()
        })
        .collect()
}

fn cpu_config(name: &str, quota: i64) -> cri::ContainerConfig {
    let mut c = container_config(name, "tool", &["loop"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: quota,
            cpu_period: if quota > 0 { 100_000 } else { 0 },
            cpu_shares: 102,
            ..Default::default()
        }),
        security_context: None,
    });
    c
}

#[tokio::main]
async fn main() {
    let requests = bench_env("REQUESTS", 2000);
    let pods = bench_env("PODS", 1000);
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    server.import(http_component(), "http").unwrap();
    let mut rt = server.runtime().await;

    // The light pod: a wasi:http handler on a host port.
    let (_, _, port) = http_pod(&server, &mut rt, "web").await.unwrap();

    println!("light wasi:http pod, {requests} sequential GETs (ms)");
    println!("| node | p50 | p99 |");
    println!("|---|---|---|");
    let mut idle = tokio::task::spawn_blocking(move || latencies(port, requests)).await.unwrap();
    println!("| idle | {:.3} | {:.3} |", percentile_ms(&mut idle, 0.5), percentile_ms(&mut idle, 0.99));
    for (label, quota) in [("10 busy pods, limits.cpu 100m each", 10_000), ("10 busy pods, no limits", 0)] {
        let mut busy = Vec::new();
        for i in 0..10 {
            let c = sandbox_config(&server, &format!("busy-{quota}-{i}"));
            let s = run_sandbox(&mut rt, &c).await.unwrap();
            let id = start(&mut rt, &s, &c, cpu_config("spin", quota)).await;
            busy.push((s, id));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut l = tokio::task::spawn_blocking(move || latencies(port, requests)).await.unwrap();
        let mut used = 0;
        for (_, id) in &busy {
            let s = rt.container_stats(cri::ContainerStatsRequest { container_id: id.clone() }).await.unwrap();
            used += s.into_inner().stats.and_then(|s| s.cpu).and_then(|c| c.usage_core_nano_seconds).unwrap().value;
        }
        println!(
            "| {label} | {:.3} | {:.3} |  (the busy pods used {:.2} CPU-seconds)",
            percentile_ms(&mut l, 0.5),
            percentile_ms(&mut l, 0.99),
            used as f64 / 1e9
        );
        for (s, _) in busy {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: s.clone() }).await.unwrap();
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: s }).await.unwrap();
        }
    }

    // Stats at PODS pods, each with one sleeping container; wasmlet's memory before and after.
    let before = rss_mib(server.pid());
    let fds_before = open_files(server.pid());
    for i in 0..pods {
        let c = sandbox_config(&server, &format!("idle-{i}"));
        let s = run_sandbox(&mut rt, &c).await.unwrap();
        start(&mut rt, &s, &c, container_config("sleep", "tool", &["sleep", "3600"])).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_mib(server.pid());
    let fds_after = open_files(server.pid());
    println!();
    println!(
        "{pods} idle pods: wasmlet's RSS {before:.1} MiB before, {after:.1} MiB after, {:.1} KiB a pod",
        (after - before) * 1024.0 / pods as f64
    );
    println!(
        "open files: {fds_before} before, {fds_after} after, {:.2} a pod",
        (fds_after - fds_before) as f64 / pods as f64
    );
    let mut list = Vec::new();
    let mut pod_list = Vec::new();
    let mut one = Vec::new();
    let ids: Vec<String> = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    for round in 0..60 {
        let t = Instant::now();
        let n =
            rt.list_container_stats(cri::ListContainerStatsRequest::default()).await.unwrap().into_inner().stats.len();
        list.push(t.elapsed());
        assert!(n > pods, "{n} container stats");
        let t = Instant::now();
        rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default()).await.unwrap();
        pod_list.push(t.elapsed());
        let t = Instant::now();
        let id = ids[round % ids.len()].clone();
        rt.container_stats(cri::ContainerStatsRequest { container_id: id }).await.unwrap();
        one.push(t.elapsed());
    }
    println!();
    println!("stats calls with {pods} pods running (ms, 60 calls each)");
    println!("| call | p50 | p99 |");
    println!("|---|---|---|");
    for (name, v) in
        [("ListContainerStats", &mut list), ("ListPodSandboxStats", &mut pod_list), ("ContainerStats", &mut one)]
    {
        println!("| {name} | {:.3} | {:.3} |", percentile_ms(v, 0.5), percentile_ms(v, 0.99));
    }
}

/// How many descriptors the process holds.
fn open_files(pid: u32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as i64).unwrap_or(-1)
}
