//! Outbound throughput of a rootless pod (run by `bash bench/outbound.sh` as root, which builds
//! the release binary first): a `wasmlet cri` running as `nobody` in rootless mode, whose pod
//! sends MB MiB through pasta to a sink in a network namespace the bench makes (over a veth
//! from the host), against the host itself sending the same to the same sink, ROUNDS times
//! each, alternating.

use std::io::{Read, Write};
use std::time::Instant;

use wasmlet_tests::*;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !is_root() {
        eprintln!("the outbound bench needs root (it makes a network namespace and runs wasmlet as nobody)");
        return;
    }
    let mb = bench_env("MB", 200);
    let rounds = bench_env("ROUNDS", 3);
    let outside = OutsideNetns::new('b');
    let port = 7100 + (std::process::id() % 500) as u16;
    outside.sink(port);
    let server = Server::start_unprivileged().await.unwrap().expect("root");
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "blaster");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let host = |mb: usize| {
        let mut c = std::net::TcpStream::connect((outside.address.as_str(), port)).unwrap();
        let chunk = vec![0u8; 1 << 16];
        let start = Instant::now();
        for _ in 0..mb * 16 {
            c.write_all(&chunk).unwrap();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        let secs = start.elapsed().as_secs_f64();
        format!("sent {mb} MiB in {secs:.3} s: {:.1} MiB/s; the sink counted {}", mb as f64 / secs, answer.trim())
    };
    println!("{mb} MiB a run to a sink in a network namespace over a veth; 2 cores");
    for round in 1..=rounds {
        let pod = async {
            let name = format!("blast-{round}");
            let c = start(
                &mut rt,
                &sb,
                &cfg,
                net_config(&name, &["blast", &outside.address, &port.to_string(), &mb.to_string()]),
            )
            .await;
            stdout_of(&mut rt, &c).await.join(" ")
        };
        if round % 2 == 1 {
            println!("round {round} host              {}", host(mb));
            println!("round {round} rootless pod      {}", pod.await);
        } else {
            println!("round {round} rootless pod      {}", pod.await);
            println!("round {round} host              {}", host(mb));
        }
    }
}
