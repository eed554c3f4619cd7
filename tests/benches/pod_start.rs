//! End-to-end pod start benchmark (run by `bash bench/pod-start.sh`, which builds the release
//! binary and installs `wasmtime` first).
//!
//! Over the real unix socket of a release `wasmlet cri`: the time from RunPodSandbox until the
//! hello container has exited (RunPodSandbox, CreateContainer, StartContainer, then the exit
//! seen on the GetContainerEvents stream), over N pods with the compiled module already cached.
//! In the same run, `wasmtime run --allow-precompiled` of the same module as a process.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmlet_tests::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<Duration>) -> (String, Duration) {
    v.sort();
    let median = percentile(&v, 0.5);
    let line = format!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
        v.len(),
        v[0].as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        percentile(&v, 0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
    (line, median)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` lists targets; nothing to list here
    }
    let pods = env_usize("PODS", 1000);
    let procs = env_usize("PROCS", 200);
    // NETWORK=host: pods on the host's network, to see what a pod's own namespace costs.
    let config = std::env::temp_dir().join(format!("wasmlet-bench-{}.toml", std::process::id()));
    let network = std::env::var("NETWORK").unwrap_or_else(|_| "rootless".into());
    // PASTA="": rootless pods without their way out (one pasta process each otherwise).
    let pasta = std::env::var("PASTA").map(|p| format!("pasta = \"{p}\"\n")).unwrap_or_default();
    std::fs::write(&config, format!("[network]\nmode = \"{network}\"\n{pasta}"))?;
    let server = Server::start_with(&["--config", config.to_str().expect("utf-8")]).await?;
    let _ = std::fs::remove_file(&config);
    let image = server.import(tool_module(), "hello")?;
    let mut rt = server.runtime().await;
    let mut events = rt.get_container_events(cri::GetEventsRequest {}).await?.into_inner();

    let mut samples = Vec::with_capacity(pods);
    let mut phases: [Vec<Duration>; 4] = Default::default();
    for i in 0..pods + 1 {
        let cfg = sandbox_config(&server, &format!("p{i}"));
        // As a kubelet does, the client makes the container's log directory itself.
        std::fs::create_dir_all(std::path::Path::new(&cfg.log_directory).join("hello"))?;
        let started = Instant::now();
        let sb = run_sandbox(&mut rt, &cfg).await?;
        let t_run = started.elapsed();
        let id = create(&mut rt, &sb, &cfg, container_config("hello", &image, &["hello"])).await?;
        let t_create = started.elapsed();
        rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
        let t_start = started.elapsed();
        loop {
            let ev = events.message().await?.expect("event stream ended");
            if ev.container_id == id && ev.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32
            {
                break;
            }
        }
        let elapsed = started.elapsed();
        let s = status(&mut rt, &id).await?;
        assert_eq!(s.exit_code, 0, "pod {i}");
        // The first pod compiles (or loads) the module; the figures are for cached starts.
        if i > 0 {
            samples.push(elapsed);
            for (p, d) in phases.iter_mut().zip([t_run, t_create - t_run, t_start - t_create, elapsed - t_start]) {
                p.push(d);
            }
        }
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() }).await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb }).await?;
    }
    let (wasmlet_line, wasmlet_median) = summary("wasmlet: RunPodSandbox -> exit over the CRI socket", samples);
    let mut lines = vec![wasmlet_line];
    let names = ["RunPodSandbox", "CreateContainer", "StartContainer", "StartContainer answered -> exit event"];
    for (name, v) in names.iter().zip(phases) {
        lines.push(summary(&format!("... of which {name}"), v).0);
    }
    let wasmtime = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let cwasm = server.dir.path().join("tool.cwasm");
    let compiled = Command::new(&wasmtime)
        .arg("compile")
        .arg(tool_module())
        .arg("-o")
        .arg(&cwasm)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut ratio = None;
    if compiled {
        let mut proc_samples = Vec::with_capacity(procs);
        for _ in 0..procs {
            let started = Instant::now();
            let out = Command::new(&wasmtime)
                .args(["run", "--allow-precompiled"])
                .arg(&cwasm)
                .arg("hello")
                .stdout(Stdio::piped())
                .output()?;
            proc_samples.push(started.elapsed());
            assert_eq!(out.stdout, b"hello from wasm\n");
        }
        let (line, median) = summary("`wasmtime run --allow-precompiled` as a process", proc_samples);
        lines.push(line);
        ratio = Some(median.as_secs_f64() / wasmlet_median.as_secs_f64());
    } else {
        eprintln!("{wasmtime} not found: the process comparison is skipped (bench/pod-start.sh installs it)");
    }
    let version = Command::new(&wasmtime)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("network mode: {network}\n");
    println!("| what | runs | min ms | median ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    if let Some(r) = ratio {
        println!(
            "\nwasmlet median is {r:.1}x faster than the process ({version}); module: tests/workloads/tool.c `hello`, {} bytes",
            std::fs::metadata(tool_module())?.len()
        );
    }
    Ok(())
}
