//! Streaming benchmark (run by `bash bench/streaming.sh`, which builds the release binary and
//! unpacks crictl first), in one run:
//! - exec round trip of `tool hello` in a running wasm container: the CRI Exec call, the
//!   upgrade to SPDY, the streams, the new instance, its output and the exit status, with an
//!   in-process SPDY client; beside it, fork+exec+wait of `/bin/echo` here, the floor of what
//!   a process-based runtime (runc, containerd) pays before its own overhead; and `crictl
//!   exec` end to end (crictl's own start included);
//! - port-forward throughput: 100 MB through `crictl port-forward` to a wasm sink in the
//!   pod, and the same 100 MB on a direct connection to it.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmlet_tests::*;

/// One exec of `cmd` over SPDY, as crictl does it; the stdout it returned.
async fn exec_once(rt: &mut RuntimeClient, id: &str, cmd: &[&str]) -> anyhow::Result<Vec<u8>> {
    let url = rt
        .exec(cri::ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            stdout: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .url;
    let (c, _) = wasmlet_streaming::spdy::dial(&url, "v4.channel.k8s.io").await?;
    let mut error = c.open(vec![("streamtype".into(), "error".into())]).await?;
    let mut stdout = c.open(vec![("streamtype".into(), "stdout".into())]).await?;
    let mut out = Vec::new();
    while let Some(d) = stdout.rx.recv().await {
        out.extend_from_slice(&d);
    }
    let mut status = Vec::new();
    while let Some(d) = error.rx.recv().await {
        status.extend_from_slice(&d);
    }
    anyhow::ensure!(status.ends_with(br#""status":"Success"}"#), "exec failed: {}", String::from_utf8_lossy(&status));
    c.close().await;
    Ok(out)
}

/// Sends `total` bytes to the sink at 127.0.0.1:`port`, ends its side and reads the count back.
fn transfer(port: u16, total: usize) -> anyhow::Result<Duration> {
    let chunk = vec![b'w'; 256 * 1024];
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        s.write_all(&chunk[..n])?;
        sent += n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let took = start.elapsed();
    anyhow::ensure!(reply.trim() == total.to_string(), "the sink counted {reply:?}, not {total}");
    Ok(took)
}

/// The same transfer through wasmlet's port forwarding with an in-process SPDY client (what
/// the server side costs, without client-go's): a CRI PortForward, the upgrade, one error and
/// one data stream as client-go opens them.
async fn transfer_spdy(rt: &mut RuntimeClient, sandbox: &str, port: u16, total: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let req = cri::PortForwardRequest { pod_sandbox_id: sandbox.to_string(), port: vec![i32::from(port)] };
    let url = rt.port_forward(req).await?.into_inner().url;
    let (conn, _) = wasmlet_streaming::spdy::dial(&url, "portforward.k8s.io").await?;
    let headers = |kind: &str| -> Vec<(String, String)> {
        vec![("streamtype".into(), kind.into()), ("port".into(), port.to_string()), ("requestid".into(), "0".into())]
    };
    let _error = conn.open(headers("error")).await?;
    let mut data = conn.open(headers("data")).await?;
    let chunk = bytes::Bytes::from(vec![b'w'; 256 * 1024]);
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        data.tx.send(chunk.slice(..n)).await?;
        sent += n;
    }
    data.tx.finish().await?;
    let mut reply = Vec::new();
    while let Some(d) = data.rx.recv().await {
        reply.extend_from_slice(&d);
    }
    let took = start.elapsed();
    conn.close().await;
    let reply = String::from_utf8_lossy(&reply);
    anyhow::ensure!(reply.trim() == total.to_string(), "the sink counted {reply:?}, not {total}");
    Ok(took)
}

/// User and system CPU seconds the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let runs = bench_env("RUNS", 200);
    let megabytes = bench_env("MEGABYTES", 100);
    let crictl =
        wasmlet_tests::cluster::k8s_bin().expect("crictl: bash ../shared/k8s/install.sh target/k8s").join("crictl");
    let server = Server::start().await?;
    server.import(tool_module(), "tool")?;
    server.import(net_component(), "net")?;
    let mut rt = server.runtime().await;
    let mut cfg = sandbox_config(&server, "bench-streaming");
    host_network(&mut cfg);
    let sb = run_sandbox(&mut rt, &cfg).await?;
    let sleeper = start(&mut rt, &sb, &cfg, container_config("sleeper", "tool", &["sleep", "100000"])).await;
    wait_log(&mut rt, &sleeper, "sleeping", Duration::from_secs(30)).await?;
    let port = free_port();
    let sink = start(&mut rt, &sb, &cfg, net_config("sink", &["sink", &port.to_string()])).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the sink {sink} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Exec round trips.
    for _ in 0..10 {
        exec_once(&mut rt, &sleeper, &["tool", "hello"]).await?;
    }
    let mut wasm = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = exec_once(&mut rt, &sleeper, &["tool", "hello"]).await?;
        wasm.push(t.elapsed());
        anyhow::ensure!(out == b"hello from wasm\n", "{out:?}");
    }
    let mut fork = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = Command::new("/bin/echo").arg("hello").output()?;
        fork.push(t.elapsed());
        anyhow::ensure!(out.status.success());
    }
    let endpoint = format!("unix://{}", server.socket().display());
    let crictl_runs = runs.min(50);
    let mut via_crictl = Vec::with_capacity(crictl_runs);
    for _ in 0..crictl_runs {
        let t = Instant::now();
        let out = Command::new(&crictl)
            .args(["--runtime-endpoint", &endpoint, "exec", &sleeper, "tool", "hello"])
            .stderr(Stdio::null())
            .output()?;
        via_crictl.push(t.elapsed());
        anyhow::ensure!(out.stdout == b"hello from wasm\n", "{out:?}");
    }
    println!("exec round trip of `tool hello` / `echo hello`, {runs} runs (crictl: {crictl_runs}):");
    println!("| what | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (what, v) in [
        ("wasmlet Exec over SPDY (in-process client)", &mut wasm),
        ("fork+exec+wait of /bin/echo (a process runtime's floor)", &mut fork),
        ("crictl exec end to end (crictl's own start included)", &mut via_crictl),
    ] {
        println!("| {what} | {:.2} | {:.2} |", percentile_ms(v, 0.5), percentile_ms(v, 0.99));
    }

    // Port-forward throughput against a direct connection.
    let total = megabytes << 20;
    let local = free_port();
    let mut pf = Command::new(&crictl)
        .args(["--runtime-endpoint", &endpoint, "port-forward", &sb, &format!("{local}:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "crictl port-forward never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mb = total as f64 / 1e6;
    let (mut direct, mut forwarded, mut in_process) = (Vec::new(), Vec::new(), Vec::new());
    // Who spends the CPU of the forwarded transfers: wasmlet (SPDY, the copy into the pod, the
    // wasm sink) or crictl (client-go's SPDY).
    let (mut wasmlet_cpu, mut crictl_cpu) = (0.0, 0.0);
    for _ in 0..3 {
        direct.push(transfer(port, total)?);
        let (w0, c0) = (cpu_seconds(server.pid()), cpu_seconds(pf.id()));
        forwarded.push(transfer(local, total)?);
        wasmlet_cpu += cpu_seconds(server.pid()) - w0;
        crictl_cpu += cpu_seconds(pf.id()) - c0;
        in_process.push(transfer_spdy(&mut rt, &sb, port, total).await?);
    }
    let _ = pf.kill();
    let _ = pf.wait();
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (d, f, i) = (best(&direct), best(&forwarded), best(&in_process));
    println!();
    println!("{megabytes} MiB into a wasm sink in the pod (best of 3):");
    println!("| path | seconds | MB/s |");
    println!("|---|---|---|");
    println!("| direct connection to the pod | {:.3} | {:.0} |", d.as_secs_f64(), mb / d.as_secs_f64());
    println!("| crictl port-forward (SPDY) | {:.3} | {:.0} |", f.as_secs_f64(), mb / f.as_secs_f64());
    println!(
        "| wasmlet's port forwarding, in-process SPDY client | {:.3} | {:.0} |",
        i.as_secs_f64(),
        mb / i.as_secs_f64()
    );
    println!(
        "port-forward / direct: crictl {:.2}, in-process client {:.2}",
        d.as_secs_f64() / f.as_secs_f64(),
        d.as_secs_f64() / i.as_secs_f64()
    );
    let spent: f64 = forwarded.iter().map(Duration::as_secs_f64).sum();
    println!(
        "CPU during the forwarded transfers: wasmlet {:.0}% of one core, crictl {:.0}%",
        100.0 * wasmlet_cpu / spent,
        100.0 * crictl_cpu / spent
    );
    Ok(())
}
