//! Resources held inside wasm, through the real server: a CPU quota on a busy guest (and
//! changed while it runs), the CPU of wasi:http requests counted in their container, what a
//! guest's sockets hold counted in its memory, and resource figures that are refused with the
//! field named.

use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

fn with_cpu(mut c: cri::ContainerConfig, quota: i64, shares: i64) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: quota,
            cpu_period: 100_000,
            cpu_shares: shares,
            ..Default::default()
        }),
        security_context: None,
    });
    c
}

/// (timestamp, cumulative CPU nanoseconds) of a container, from ContainerStats.
async fn cpu_of(rt: &mut RuntimeClient, id: &str) -> (i64, u64) {
    let s = rt.container_stats(cri::ContainerStatsRequest { container_id: id.to_string() }).await.unwrap();
    let cpu = s.into_inner().stats.and_then(|s| s.cpu).expect("cpu stats");
    (cpu.timestamp, cpu.usage_core_nano_seconds.map_or(0, |v| v.value))
}

/// Cores a container used over `window`, as ContainerStats tells it.
async fn cores(rt: &mut RuntimeClient, id: &str, window: Duration) -> f64 {
    let (t0, c0) = cpu_of(rt, id).await;
    tokio::time::sleep(window).await;
    let (t1, c1) = cpu_of(rt, id).await;
    (c1 - c0) as f64 / (t1 - t0) as f64
}

#[tokio::test]
async fn a_cpu_limit_holds_a_busy_guest_and_changes_while_it_runs() {
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "busy");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    // limits.cpu 200m, as the kubelet asks for it.
    let busy = start(&mut rt, &sb, &cfg, with_cpu(container_config("spin", "tool", &["loop"]), 20_000, 204)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let used = cores(&mut rt, &busy, Duration::from_millis(2000)).await;
    assert!((0.18..=0.22).contains(&used), "limits.cpu 200m used {used:.3} cores");
    // A neighbour pod runs its commands meanwhile.
    let other = sandbox_config(&server, "neighbour");
    let sb2 = run_sandbox(&mut rt, &other).await.unwrap();
    let quiet = start(&mut rt, &sb2, &other, container_config("quiet", "tool", &["sleep", "60"])).await;
    let req =
        cri::ExecSyncRequest { container_id: quiet.clone(), cmd: vec!["tool".into(), "hello".into()], timeout: 5 };
    let out = rt.exec_sync(req).await.unwrap().into_inner();
    assert_eq!((out.exit_code, String::from_utf8_lossy(&out.stdout).trim()), (0, "hello from wasm"));
    // UpdateContainerResources: half a core from now on.
    let half = cri::LinuxContainerResources { cpu_quota: 50_000, cpu_period: 100_000, ..Default::default() };
    let update = |id: &str, linux: cri::LinuxContainerResources| cri::UpdateContainerResourcesRequest {
        container_id: id.to_string(),
        linux: Some(linux),
        ..Default::default()
    };
    rt.update_container_resources(update(&busy, half.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let used = cores(&mut rt, &busy, Duration::from_millis(2000)).await;
    assert!((0.45..=0.55).contains(&used), "a 500m quota used {used:.3} cores");
    // Figures the kernel would refuse are refused, the field named; the guest runs on.
    let tiny = cri::LinuxContainerResources { cpu_quota: 500, ..Default::default() };
    let e = rt.update_container_resources(update(&busy, tiny)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("cpu_quota 500 us"), "{}", e.message());
    let e = start_err(&mut rt, &sb, &cfg, with_cpu(container_config("bad", "tool", &["hello"]), 20_000, -5)).await;
    assert!(e.message().contains("cpu_shares -5"), "{}", e.message());
    let mut negative = container_config("neg", "tool", &["hello"]);
    negative.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: -7, ..Default::default() }),
        security_context: None,
    });
    let e = start_err(&mut rt, &sb, &cfg, negative).await;
    assert!(e.message().contains("memory_limit_in_bytes -7"), "{}", e.message());
    // Absurd, but valid: a quota of more cores than the node has is no limit at all.
    let huge = cri::LinuxContainerResources { cpu_quota: 100_000_000, cpu_period: 100_000, ..Default::default() };
    rt.update_container_resources(update(&busy, huge)).await.unwrap();
    // An exited container's resources cannot change.
    rt.stop_container(cri::StopContainerRequest { container_id: busy.clone(), timeout: 0 }).await.unwrap();
    let e = rt.update_container_resources(update(&busy, half)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("has exited"), "{}", e.message());
}

async fn start_err(
    rt: &mut RuntimeClient,
    sb: &str,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> tonic::Status {
    let e = create(rt, sb, cfg, c).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    e
}

#[tokio::test]
async fn the_cpu_of_wasi_http_requests_counts_in_their_container() {
    let server = Server::start().await.unwrap();
    server.import(http_component(), "http").unwrap();
    let mut rt = server.runtime().await;
    let (_, web, port) = http_pod(&server, &mut rt, "web").await.unwrap();
    let get = move || http_get(port, "/n").map(|a| a.starts_with("HTTP/1.0 200"));
    let (_, idle0) = cpu_of(&mut rt, &web).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, idle1) = cpu_of(&mut rt, &web).await;
    let answered =
        tokio::task::spawn_blocking(move || (0..300).filter(|_| get().is_ok_and(|ok| ok)).count()).await.unwrap();
    assert_eq!(answered, 300);
    let (_, busy) = cpu_of(&mut rt, &web).await;
    // Each request is an instance of the component, and HTTP parsed for it: a millisecond
    // for 300 of them is far below what they cost, and far above the idle server's.
    let idle = idle1 - idle0;
    assert!(busy - idle1 > 1_000_000 && busy - idle1 > 20 * idle, "300 requests: {} ns; idle: {idle} ns", busy - idle1);
}

/// A pod's network counters, from PodSandboxStats: (interface, rx bytes, tx bytes).
async fn pod_network(rt: &mut RuntimeClient, sb: &str) -> (String, u64, u64) {
    let stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: sb.to_string() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let net = stats.linux.unwrap().network.expect("a pod of its own network reports it");
    let i = net.default_interface.unwrap();
    assert_eq!(net.interfaces.len(), 1, "{:?}", net.interfaces);
    (i.name, i.rx_bytes.unwrap().value, i.tx_bytes.unwrap().value)
}

#[tokio::test]
async fn a_pods_network_bytes_and_its_metrics_are_reported() {
    // The rootless network, whatever the user (as root the default is the bridge, whose pods
    // report eth0): the pod's loopback is its only interface and carries every byte.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wasmlet.toml");
    // (Without pasta: its link would be a second interface.)
    std::fs::write(&config, "[network]\nmode = \"rootless\"\npasta = \"\"\n").unwrap();
    let server = Server::start_with(&["--config", config.to_str().unwrap()]).await.unwrap();
    server.import(http_component(), "http").unwrap();
    let mut rt = server.runtime().await;
    let (sb, web, port) = http_pod(&server, &mut rt, "web").await.unwrap();
    let (name, rx0, tx0) = pod_network(&mut rt, &sb).await;
    // wasmlet's own pod network: the pod's address is on its loopback, its only interface.
    assert_eq!(name, "lo");
    let received =
        tokio::task::spawn_blocking(move || (0..50).map(|_| http_get(port, "/").unwrap().len() as u64).sum())
            .await
            .unwrap();
    let (_, rx1, tx1) = pod_network(&mut rt, &sb).await;
    let (rx, tx) = (rx1 - rx0, tx1 - tx0);
    // Every byte of the 50 exchanges crossed the pod's loopback (host ports are forwarded in),
    // with TCP/IP headers and handshakes: far less than 2 KiB of those per connection.
    assert!(rx >= received && rx < received + 50 * 2048, "{rx} bytes received on lo for {received} of answers");
    assert_eq!(rx, tx, "on a loopback every byte sent is received");

    // The same through ListPodSandboxMetrics, under the descriptors' names and label keys.
    let descriptors = rt.list_metric_descriptors(cri::ListMetricDescriptorsRequest {}).await.unwrap().into_inner();
    let keys: std::collections::HashMap<String, usize> =
        descriptors.descriptors.iter().map(|d| (d.name.clone(), d.label_keys.len())).collect();
    assert_eq!(keys.len(), descriptors.descriptors.len(), "names are unique");
    for name in ["container_cpu_usage_seconds_total", "container_memory_working_set_bytes"] {
        assert!(keys.contains_key(name), "{name} described");
    }
    let metrics = rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {}).await.unwrap().into_inner();
    let pod = metrics.pod_metrics.iter().find(|m| m.pod_sandbox_id == sb).expect("the pod's metrics");
    let all = pod.metrics.iter().chain(pod.container_metrics.iter().flat_map(|c| c.metrics.iter()));
    for m in all {
        assert_eq!(Some(&m.label_values.len()), keys.get(&m.name), "{m:?}: label values against its descriptor");
    }
    let rx_metric = pod.metrics.iter().find(|m| m.name == "container_network_receive_bytes_total").unwrap();
    assert_eq!(rx_metric.label_values, [sb.as_str(), "POD", "", "lo"]);
    assert!(rx_metric.value.unwrap().value >= rx1);
    let c = pod.container_metrics.iter().find(|c| c.container_id == web).expect("the container's metrics");
    let ws = c.metrics.iter().find(|m| m.name == "container_memory_working_set_bytes").unwrap();
    assert_eq!(ws.label_values, [web.as_str(), "web", "docker.io/library/http:latest"]);
    // A wasi:http container holds memory only while it answers: none now, as its stats say.
    let stats = rt.container_stats(cri::ContainerStatsRequest { container_id: web.clone() }).await.unwrap();
    let held = stats.into_inner().stats.unwrap().memory.unwrap().working_set_bytes.unwrap().value;
    assert_eq!(ws.value.unwrap().value, held);
    let limit = c.metrics.iter().find(|m| m.name == "container_spec_memory_limit_bytes").unwrap();
    assert_eq!(limit.value.unwrap().value, 0, "no limit set");
}

async fn working_set(rt: &mut RuntimeClient, id: &str) -> u64 {
    let s = rt.container_stats(cri::ContainerStatsRequest { container_id: id.to_string() }).await.unwrap();
    s.into_inner().stats.unwrap().memory.unwrap().working_set_bytes.unwrap().value
}

#[tokio::test]
async fn what_a_guests_sockets_hold_counts_in_its_memory() {
    // A guest that accepts a connection and never reads it: what the test sends waits in the
    // guest's socket, memory a cgroup would charge to the container.
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let port = free_port();
    let cfg = with_ports(sandbox_config(&server, "holder"), &[(8080, port as i32)]);
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let id = start(&mut rt, &sb, &cfg, net_config("hold", &["hold", "8080"])).await;
    wait_log(&mut rt, &id, "listening on 8080", Duration::from_secs(30)).await.unwrap();
    let before = working_set(&mut rt, &id).await;
    let sender = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        // Until the queues on the way are full and a write waits.
        while s.write_all(&[1u8; 16 * 1024]).is_ok() {}
        s
    })
    .await
    .unwrap();
    wait_log(&mut rt, &id, "holding a connection", Duration::from_secs(30)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let held = loop {
        let now = working_set(&mut rt, &id).await;
        if now >= before + 32 * 1024 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "working set {now} bytes, {before} before the guest's queue filled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The guest's own memory did not move: the difference is its socket's queue.
    assert!(held - before <= 8 << 20, "{held} bytes held against {before}: more than a socket queue");
    drop(sender);
    rt.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 0 }).await.unwrap();
    assert_eq!(working_set(&mut rt, &id).await, 0, "an exited container holds nothing");
}
