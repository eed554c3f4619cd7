//! Pull and compiled-code cache benchmark (run by `bash bench/pod-start.sh`): a module of a
//! few MB (generated: many functions, a WASI hello at the end) is pushed to a local
//! docker-registry, then through a release `wasmlet cri`: the first start (PullImage, which
//! compiles, then a pod to the exit), starts with the code cached in memory, and the first start
//! after a restart of wasmlet on the same root (the code comes from the on-disk cache).

use std::time::{Duration, Instant};

use wasmlet_tests::*;

fn big_module(functions: usize) -> Vec<u8> {
    let mut wat = String::from(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
"#,
    );
    for i in 0..functions {
        wat.push_str(&format!(
            "  (func $f{i} (export \"f{i}\") (param i32) (result i32)\n    local.get 0 i32.const {i} i32.add i32.const 3 i32.mul local.get 0 i32.xor\n    i32.const 7 i32.rem_u local.get 0 i32.const {} i32.shl i32.or)\n",
            i % 31
        ));
    }
    wat.push_str(
        r#"  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#,
    );
    wat::parse_str(wat).expect("valid wat")
}

async fn one_pod(rt: &mut RuntimeClient, server: &Server, name: &str, image: &str) -> anyhow::Result<Duration> {
    let mut events = rt.get_container_events(cri::GetEventsRequest {}).await?.into_inner();
    let cfg = sandbox_config(server, name);
    std::fs::create_dir_all(std::path::Path::new(&cfg.log_directory).join("hello"))?;
    let started = Instant::now();
    let sb = run_sandbox(rt, &cfg).await?;
    let mut c = container_config("hello", image, &[]);
    c.command.clear();
    let id = create(rt, &sb, &cfg, c).await?;
    rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
    loop {
        let ev = events.message().await?.expect("event stream ended");
        if ev.container_id == id && ev.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32 {
            break;
        }
    }
    let elapsed = started.elapsed();
    let s = status(rt, &id).await?;
    assert_eq!(s.exit_code, 0);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() }).await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb }).await?;
    Ok(elapsed)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let functions = std::env::var("FUNCTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(40_000);
    let warm = std::env::var("WARM").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let restarts = std::env::var("RESTARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let wasm = big_module(functions);
    let registry = RegistryServer::start().await?;
    let file = registry.dir.path().join("big.wasm");
    std::fs::write(&file, &wasm)?;
    let image = format!("{}/bench/big:1", registry.host);
    push(&file, &image)?;

    let mut server = Server::start().await?;
    let mut img = server.images().await;
    let mut rt = server.runtime().await;
    let started = Instant::now();
    img.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
        ..Default::default()
    })
    .await?;
    let pull = started.elapsed();
    let first_pod = one_pod(&mut rt, &server, "first", &image).await?;
    let mut cached = Vec::new();
    for i in 0..warm {
        cached.push(one_pod(&mut rt, &server, &format!("w{i}"), &image).await?);
    }
    let mut after_restart = Vec::new();
    for i in 0..restarts {
        server.kill9();
        server.spawn().await?;
        rt = server.runtime().await;
        after_restart.push(one_pod(&mut rt, &server, &format!("r{i}"), &image).await?);
    }
    let log = server.server_log();
    if std::env::var_os("SHOW_PULL_LOG").is_some() {
        for l in log.lines().filter(|l| l.contains("blob ready") || l.contains("compiled") || l.contains("pulled")) {
            eprintln!("{l}");
        }
    }
    let compiles = log.matches("compiled wasm").count();
    println!("module: {} bytes ({functions} functions)\n", wasm.len());
    println!("| start | runs | median ms |");
    println!("|---|---|---|");
    println!("| first: PullImage (download, verify, compile) | 1 | {} |", ms(pull));
    println!("| first pod after the pull (code in memory) | 1 | {} |", ms(first_pod));
    println!("| later pods, code cached in memory | {warm} | {} |", ms(median(cached)));
    println!(
        "| first pod after a wasmlet restart (code from the disk cache) | {restarts} | {} |",
        ms(median(after_restart))
    );
    println!("\ncompilations over the whole run: {compiles}");

    Ok(())
}
