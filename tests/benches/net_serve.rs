//! Serving benchmark (run by `bash bench/net-serve.sh`, which builds the release binary and
//! installs `wasmtime` and `wrk` first): requests per second and latency, measured by `wrk`,
//! of the wasi:http handler (`workloads/http.c`) and of the wasi:sockets server
//! (`workloads/net.c serve`) in a wasmlet pod, reached through the pod's host port, and of the
//! same components under `wasmtime serve` / `wasmtime run -S inherit-network`, in the same run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasmlet_tests::*;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Waits until `GET /` on `addr` answers.
fn wait_http(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::net::TcpStream::connect(addr).and_then(|mut c| {
            use std::io::{Read, Write};
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s.starts_with("HTTP/1."))
        });
        if ok.unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `wrk` against `addr`: (requests per second, median ms, p99 ms, errors line if any).
fn wrk(addr: &str) -> (f64, String, String, String) {
    let out = Command::new("wrk")
        .args(["-t", &env("WRK_THREADS", "2"), "-c", &env("WRK_CONNECTIONS", "16"), "-d", &env("WRK_SECONDS", "10")])
        .arg("--latency")
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let errors =
        text.lines().filter(|l| l.contains("Non-2xx") || l.contains("Socket errors")).collect::<Vec<_>>().join("; ");
    (rps, field("50%").unwrap_or_default(), field("99%").unwrap_or_default(), errors)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let server = Server::start().await?;
    server.import(http_component(), "http")?;
    server.import(net_component(), "net")?;
    let mut rt = server.runtime().await;
    let mut rows = Vec::new();
    let mut ports = Vec::new();
    for (name, image, args) in [("http", "http", vec![]), ("sockets", "net", vec!["serve", "8080"])] {
        let port = free_port();
        let mut cfg = sandbox_config(&server, &format!("bench-{name}"));
        cfg.port_mappings = vec![cri::PortMapping {
            protocol: 0,
            container_port: 8080,
            host_port: port as i32,
            host_ip: String::new(),
        }];
        let sb = run_sandbox(&mut rt, &cfg).await?;
        let mut c = container_config(name, image, &args);
        c.command = if image == "net" { vec!["net".into()] } else { vec![] };
        let id = create(&mut rt, &sb, &cfg, c).await?;
        rt.start_container(cri::StartContainerRequest { container_id: id }).await?;
        ports.push(port);
    }
    for (what, port) in [
        ("wasmlet pod, wasi:http handler, via its host port", ports[0]),
        ("wasmlet pod, wasi:sockets server, via its host port", ports[1]),
    ] {
        let addr = format!("127.0.0.1:{port}");
        wait_http(&addr);
        rows.push((what.to_string(), tokio::task::spawn_blocking(move || wrk(&addr)).await?));
    }
    // The peer: the same components under wasmtime, as processes on the host's network.
    let port = free_port();
    let _serve = Killed(
        Command::new("wasmtime")
            .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
            .arg(http_component())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let addr = format!("127.0.0.1:{port}");
    wait_http(&addr);
    rows.push(("`wasmtime serve`, the same handler".into(), tokio::task::spawn_blocking(move || wrk(&addr)).await?));
    let port = free_port();
    let _run = Killed(
        Command::new("wasmtime")
            .args(["run", "-S", "inherit-network=y", "--env", "HOSTNAME=wasmtime"])
            .arg(net_component())
            .args(["serve", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let addr = format!("127.0.0.1:{port}");
    wait_http(&addr);
    rows.push((
        "`wasmtime run -S inherit-network`, the same server".into(),
        tokio::task::spawn_blocking(move || wrk(&addr)).await?,
    ));

    println!(
        "wrk -t{} -c{} -d{}s, 2 cores shared by client and server\n",
        env("WRK_THREADS", "2"),
        env("WRK_CONNECTIONS", "16"),
        env("WRK_SECONDS", "10")
    );
    println!("| server | requests/s | median | p99 | errors |");
    println!("|---|---|---|---|---|");
    for (what, (rps, p50, p99, errors)) in rows {
        println!("| {what} | {rps:.0} | {p50} | {p99} | {errors} |");
    }
    Ok(())
}
