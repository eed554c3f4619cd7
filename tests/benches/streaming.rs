//! Streaming benchmark (run by `bash bench/streaming.sh`, which builds the release binary and
//! unpacks crictl first), in one run:
//! - exec round trip of `tool hello` in a running wasm container: the CRI Exec call, the
//!   upgrade to SPDY, the streams, the new instance, its output and the exit status, with an
//!   in-process SPDY client; beside it, fork+exec+wait of `/bin/echo` here, the floor of what
//!   a process-based runtime (runc, containerd) pays before its own overhead; and `crictl
//!   exec` end to end (crictl's own start included);
//! - port-forward throughput: 100 MB through `crictl port-forward` (SPDY and WebSocket) and
//!   an in-process SPDY client to a wasm sink in the pod; the same 100 MB on a direct
//!   connection to it, and through one and two plain relays (two threads copying, no
//!   framing), the least any forwarder (and a client and server pair) that copies in user
//!   space pays.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
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

/// Sends `total` bytes to the sink at `to`, ends its side and reads the count back.
fn transfer(to: SocketAddr, total: usize) -> anyhow::Result<Duration> {
    let chunk = vec![b'w'; 256 * 1024];
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(to)?;
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

/// A plain relay on a free loopback port to `to`: a thread per direction, blocking reads and
/// writes of 128 KiB (or, with `splice`, splice(2) through a 1 MiB pipe: no copy in user
/// space), no framing. What any forwarder pays at the least, on this machine, in the same run.
fn plain_relay(to: SocketAddr, splice: bool) -> anyhow::Result<SocketAddr> {
    fn copy(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
        let mut buf = vec![0u8; 128 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
    fn splice_copy(from: std::net::TcpStream, to: std::net::TcpStream) {
        use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
        let Ok((r, w)) = pipe_with(PipeFlags::CLOEXEC) else { return };
        let _ = fcntl_setpipe_size(&r, 1 << 20);
        while let Ok(n) = splice(&from, None, &w, None, 1 << 20, SpliceFlags::MOVE) {
            let mut left = n;
            while left > 0 {
                match splice(&r, None, &to, None, left, SpliceFlags::MOVE) {
                    Ok(k) if k > 0 => left -= k,
                    _ => return,
                }
            }
            if n == 0 {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
    let pump = if splice { splice_copy } else { copy };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(pod) = std::net::TcpStream::connect(to) else { continue };
            let _ = (client.set_nodelay(true), pod.set_nodelay(true));
            let (Ok(c2), Ok(p2)) = (client.try_clone(), pod.try_clone()) else { continue };
            std::thread::spawn(move || pump(p2, c2));
            std::thread::spawn(move || pump(client, pod));
        }
    });
    Ok(addr)
}

/// Starts `crictl port-forward` with `transport` on a free local port to `port` of `sandbox`.
fn crictl_forward(
    crictl: &Path,
    endpoint: &str,
    sandbox: &str,
    port: u16,
    transport: &str,
) -> anyhow::Result<(std::process::Child, SocketAddr)> {
    let local = free_port();
    let mut cmd = Command::new(crictl);
    cmd.args(["--runtime-endpoint", endpoint, "port-forward", "--transport", transport, sandbox]);
    cmd.arg(format!("{local}:{port}"));
    listening(cmd, local)
}

/// Spawns a forwarder and waits until it listens on 127.0.0.1:`local`.
fn listening(mut cmd: Command, local: u16) -> anyhow::Result<(std::process::Child, SocketAddr)> {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("{cmd:?} never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, SocketAddr::from(([127, 0, 0, 1], local))))
}

/// The sandbox config with the pod-name label a kubelet gives, which `wasmlet port-forward`
/// finds pods by.
fn named(mut cfg: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    let name = cfg.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    cfg.labels.insert(wasmlet_kubelet::cri::POD_NAME.into(), name);
    cfg
}

/// The ways into the pod's sink that the port-forward table measures.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Direct,
    Relay,
    Relays,
    CrictlSpdy,
    CrictlWebsocket,
    InProcess,
    Cli,
    Spliced,
}

impl Way {
    const ALL: [Way; 8] = [
        Way::Direct,
        Way::Relay,
        Way::Relays,
        Way::CrictlSpdy,
        Way::CrictlWebsocket,
        Way::InProcess,
        Way::Cli,
        Way::Spliced,
    ];

    fn what(self) -> &'static str {
        match self {
            Way::Direct => "direct connection to the pod",
            Way::Relay => "plain relay (two threads, blocking copy, no framing)",
            Way::Relays => "two plain relays in a row",
            Way::CrictlSpdy => "crictl port-forward (SPDY)",
            Way::CrictlWebsocket => "crictl port-forward --transport websocket",
            Way::InProcess => "wasmlet's port forwarding, in-process SPDY client",
            Way::Cli => "wasmlet port-forward (the CLI, SPDY)",
            Way::Spliced => "splicing relay (splice(2) through a pipe, no framing)",
        }
    }
}

/// What the port-forward table needs beside the pod.
struct Forwarding<'a> {
    crictl: &'a Path,
    /// A run dir for `wasmlet port-forward` that leads to the server.
    run_dir: &'a Path,
    endpoint: &'a str,
    server: &'a Server,
    total: usize,
}

impl Forwarding<'_> {
    /// Sends `total` bytes into the sink of `sandbox` (at `direct` from the host) each way,
    /// best of 3, and prints the table.
    async fn run(
        &self,
        rt: &mut RuntimeClient,
        pod: &str,
        (name, sandbox): (&str, &str),
        direct: SocketAddr,
    ) -> anyhow::Result<()> {
        let (total, port) = (self.total, direct.port());
        let (mut pf, local) = crictl_forward(self.crictl, self.endpoint, sandbox, port, "spdy")?;
        let (mut ws, ws_local) = crictl_forward(self.crictl, self.endpoint, sandbox, port, "websocket")?;
        let (mut cli, cli_local) = wasmlet_forward(self.run_dir, name, port)?;
        let relay = plain_relay(direct, false)?;
        // Two in a row: a local client and a server, as with crictl and wasmlet, at the least.
        let relays = plain_relay(relay, false)?;
        let spliced = plain_relay(direct, true)?;
        let mb = total as f64 / 1e6;
        // Each way with its times; the direct connection first, the one the others are
        // measured against.
        let mut ways: Vec<(Way, Vec<Duration>)> = Way::ALL.iter().map(|&w| (w, Vec::new())).collect();
        // Who spends the CPU of the crictl transfers: wasmlet (SPDY, the copy into the pod,
        // the wasm sink) or crictl (client-go's SPDY).
        let (mut wasmlet_cpu, mut crictl_cpu) = (0.0, 0.0);
        for _ in 0..3 {
            for (way, times) in &mut ways {
                let spdy = *way == Way::CrictlSpdy;
                let cpu0 = spdy.then(|| (cpu_seconds(self.server.pid()), cpu_seconds(pf.id())));
                let took = match way {
                    Way::Direct => transfer(direct, total)?,
                    Way::Relay => transfer(relay, total)?,
                    Way::Relays => transfer(relays, total)?,
                    Way::CrictlSpdy => transfer(local, total)?,
                    Way::CrictlWebsocket => transfer(ws_local, total)?,
                    Way::InProcess => transfer_spdy(rt, sandbox, port, total).await?,
                    Way::Cli => transfer(cli_local, total)?,
                    Way::Spliced => transfer(spliced, total)?,
                };
                if let Some((w0, c0)) = cpu0 {
                    wasmlet_cpu += cpu_seconds(self.server.pid()) - w0;
                    crictl_cpu += cpu_seconds(pf.id()) - c0;
                }
                times.push(took);
            }
        }
        for child in [&mut pf, &mut ws, &mut cli] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64();
        let direct_best = best(&ways[0].1);
        println!();
        println!("{} MiB into a wasm sink in {pod} (best of 3):", total >> 20);
        println!("| path | seconds | MB/s | against direct |");
        println!("|---|---|---|---|");
        for (way, times) in &ways {
            let t = best(times);
            println!("| {} | {t:.3} | {:.0} | {:.2} |", way.what(), mb / t, direct_best / t);
        }
        let spdy = &ways.iter().find(|(w, _)| *w == Way::CrictlSpdy).expect("measured").1;
        let spent: f64 = spdy.iter().map(Duration::as_secs_f64).sum();
        println!(
            "CPU during the crictl SPDY transfers: wasmlet {:.0}% of one core, crictl {:.0}%",
            100.0 * wasmlet_cpu / spent,
            100.0 * crictl_cpu / spent
        );
        Ok(())
    }
}

/// Starts `wasmlet port-forward POD LOCAL:PORT` (the CLI `wasmlet run` users have) on a free
/// local port. It finds pods through the `kubelet-*.sock` links of a run dir; `run_dir` holds
/// one to the bench's server.
fn wasmlet_forward(run_dir: &Path, pod: &str, port: u16) -> anyhow::Result<(std::process::Child, SocketAddr)> {
    let local = free_port();
    let config = run_dir.join("config.toml");
    std::fs::write(&config, format!("run_dir = {:?}\n", run_dir.display().to_string()))?;
    let mut cmd = Command::new(wasmlet_bin());
    cmd.args(["port-forward", "--config"]).arg(&config).args([pod, &format!("{local}:{port}")]);
    listening(cmd, local)
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
    let mut cfg = named(sandbox_config(&server, "bench-streaming"));
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

    // Port-forward throughput against a direct connection: to the host-network pod (kernel
    // loopback, the fastest direct path there is) and, as root, to a pod on wasmlet's bridge
    // at its pod IP (how a cluster reaches a pod).
    let total = megabytes << 20;
    let sink_at = SocketAddr::from(([127, 0, 0, 1], port));
    let run_dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(server.socket(), run_dir.path().join("kubelet-bench.sock"))?;
    let table = Forwarding { crictl: &crictl, run_dir: run_dir.path(), endpoint: &endpoint, server: &server, total };
    table.run(&mut rt, "a host-network pod", ("bench-streaming", &sb), sink_at).await?;
    if is_root() {
        let cfg = named(sandbox_config(&server, "bench-streaming-bridge"));
        let bridged = run_sandbox(&mut rt, &cfg).await?;
        let sink = start(&mut rt, &bridged, &cfg, net_config("sink", &["sink", &port.to_string()])).await;
        wait_log(&mut rt, &sink, "listening", Duration::from_secs(30)).await?;
        let ip = pod_ip(&mut rt, &bridged).await;
        // Dial the pod IP only where it is on wasmlet's bridge on this machine.
        ensure_on_device(&ip, "wasmlet0")?;
        let at = SocketAddr::new(ip.parse()?, port);
        table
            .run(&mut rt, "a pod on wasmlet's bridge, at its pod IP", ("bench-streaming-bridge", &bridged), at)
            .await?;
    }
    Ok(())
}
