//! The CRI streaming server against crictl (a Go client: SPDY through moby/spdystream, and
//! WebSocket), on the real server with real wasm: exec with stdin, stdout, stderr, exit codes
//! and a tty; attach to a container's stdin and output; port-forward to a wasm server; single-use URLs; bad commands.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// crictl from the Kubernetes binaries (skipped without them, a failure under CI).
fn crictl_bin() -> Option<PathBuf> {
    match wasmlet_tests::cluster::k8s_bin() {
        Some(dir) => Some(dir.join("crictl")),
        None if std::env::var_os("CI").is_some() => {
            panic!("crictl is missing: scripts/test unpacks it from ../shared/k8s")
        }
        None => {
            eprintln!("skipped: no crictl (unpack ../shared/k8s with `bash ../shared/k8s/install.sh target/k8s`)");
            None
        }
    }
}

struct Pod {
    server: Server,
    rt: RuntimeClient,
    sandbox: String,
    config: cri::PodSandboxConfig,
    crictl: PathBuf,
}

impl Pod {
    async fn new(name: &str) -> Option<Pod> {
        let crictl = crictl_bin()?;
        let server = Server::start().await.unwrap();
        server.import(tool_module(), "tool").unwrap();
        server.import(tool_component(), "toolc").unwrap();
        server.import(http_component(), "http").unwrap();
        let mut rt = server.runtime().await;
        let config = sandbox_config(&server, name);
        let sandbox = run_sandbox(&mut rt, &config).await.unwrap();
        Some(Pod { server, rt, sandbox, config, crictl })
    }

    /// A running container of `image` (it sleeps for a long time).
    async fn sleeper(&mut self, name: &str, image: &str) -> String {
        let id =
            start(&mut self.rt, &self.sandbox, &self.config, container_config(name, image, &["sleep", "600"])).await;
        wait_log(&mut self.rt, &id, "sleeping", WAIT).await.unwrap();
        id
    }

    fn crictl(&self) -> Command {
        let mut c = Command::new(&self.crictl);
        c.arg("--runtime-endpoint").arg(format!("unix://{}", self.server.socket().display()));
        c.args(["--timeout", "20s"]);
        c
    }

    /// `crictl exec ARGS` with `stdin` as its standard input.
    fn exec(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run("exec", args, stdin)
    }

    /// `crictl attach ARGS` with `stdin` as its standard input.
    fn attach(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run("attach", args, stdin)
    }

    /// `crictl COMMAND ARGS` with `stdin` as its standard input.
    fn run(&self, command: &str, args: &[&str], stdin: &[u8]) -> Output {
        output_with_input(self.crictl().arg(command).args(args), stdin).unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn crictl_exec_over_spdy_and_websocket() {
    let Some(mut pod) = Pod::new("exec").await else { return };
    let c = pod.sleeper("sleeper", "tool").await;
    for transport in ["spdy", "websocket"] {
        // stdout and stderr apart, the exit code as the process's.
        let out = pod.exec(&["--transport", transport, &c, "tool", "stderr", "oops"], b"");
        assert!(out.status.success(), "{transport}: {out:?}");
        assert_eq!(text(&out.stdout), "to stdout\n", "{transport}");
        assert!(text(&out.stderr).contains("oops\n"), "{transport}: {out:?}");

        // crictl reports the code as kubectl words it (and exits with 1 itself).
        let out = pod.exec(&["--transport", transport, &c, "tool", "exit", "3"], b"");
        assert!(!out.status.success(), "{transport}: {out:?}");
        assert!(text(&out.stderr).contains("command terminated with exit code 3"), "{transport}: {out:?}");
        assert_eq!(text(&out.stdout), "exiting with 3\n", "{transport}");

        // stdin through to the guest and back.
        let out = pod.exec(&["--transport", transport, "-i", &c, "tool", "stdin"], b"hello through stdin");
        assert!(out.status.success(), "{transport}: {out:?}");
        assert_eq!(text(&out.stdout), "hello through stdin", "{transport}");
        assert!(text(&out.stderr).contains("read 19 bytes"), "{transport}: {out:?}");

        // With a tty the guest sees a terminal (and its stderr on it). crictl wants a terminal
        // of its own for -t: script(1) gives it one.
        let cmd = format!(
            "{} --runtime-endpoint unix://{} exec --transport {transport} -it {c} tool isatty",
            pod.crictl.display(),
            pod.server.socket().display()
        );
        let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{transport}: {out:?}");
        assert!(text(&out.stdout).contains("stdin=1 stdout=1 stderr=1"), "{transport}: {out:?}");
        let out = pod.exec(&["--transport", transport, &c, "tool", "isatty"], b"");
        assert!(text(&out.stdout).contains("stdin=0 stdout=0 stderr=0"), "{transport}: {out:?}");
        // ^C on the terminal ends the command as SIGINT ends a process (130).
        let cmd = format!(
            "{} --runtime-endpoint unix://{} exec --transport {transport} -it {c} tool sleep 100",
            pod.crictl.display(),
            pod.server.socket().display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut keys = child.stdin.take().unwrap();
        let typing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            let _ = keys.write_all(b"\x03");
        });
        let out = child.wait_with_output().unwrap();
        typing.join().unwrap();
        let screen = text(&out.stdout);
        assert!(screen.contains("^C") && screen.contains("exit code 130"), "{transport}: {screen:?}");
    }
    // A component container, and a command that cannot be run: the error reaches the client.
    let cc = pod.sleeper("sleeper-c", "toolc").await;
    let out = pod.exec(&[&cc, "tool", "echo", "x"], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("argv[2]=x"), "{out:?}");
    let out = pod.exec(&[&c, "/no/such.wasm"], b"");
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("/no/such.wasm") && err.contains("no such file or directory"), "{out:?}");
    // Exec in a container that is not there is refused before any URL.
    let out = pod.exec(&["nosuchcontainer", "tool"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not found"), "{out:?}");
}

#[tokio::test]
async fn crictl_attach_reaches_a_containers_stdin_and_output() {
    let Some(mut pod) = Pod::new("attach").await else { return };
    for transport in ["spdy", "websocket"] {
        // stdinOnce: what the session types reaches the container, and its end closes the
        // container's stdin, so `tool stdin` ends; its output reaches the session and the log.
        let mut cfg = container_config(&format!("once-{transport}"), "tool", &["stdin"]);
        cfg.stdin = true;
        cfg.stdin_once = true;
        let id = start(&mut pod.rt, &pod.sandbox, &pod.config, cfg).await;
        let out = pod.attach(&["--transport", transport, "-i", &id], b"typed into attach\n");
        assert!(out.status.success(), "{transport}: {out:?}");
        assert_eq!(text(&out.stdout), "typed into attach\n", "{transport}: {out:?}");
        assert!(text(&out.stderr).contains("read 18 bytes"), "{transport}: {out:?}");
        let status = wait_exited(&mut pod.rt, &id, WAIT).await.unwrap();
        assert_eq!(status.exit_code, 0, "{transport}");
        let log = read_log(std::path::Path::new(&status.log_path)).unwrap();
        assert_eq!(texts(&log, "stdout"), ["typed into attach"], "{transport}");
    }
    // Output only: a session joins a running container, gets what it writes from then on,
    // and ends when the container does.
    let id = start(&mut pod.rt, &pod.sandbox, &pod.config, container_config("later", "tool", &["sleep", "2"])).await;
    wait_log(&mut pod.rt, &id, "sleeping", WAIT).await.unwrap();
    let out = pod.attach(&[&id], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "slept\n", "{out:?}");
    // A stopped container cannot be attached to.
    let out = pod.attach(&[&id], b"");
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("not running"), "{out:?}");
}

#[tokio::test]
async fn a_large_stdin_streams_in_bounded_memory() {
    let Some(mut pod) = Pod::new("bigstdin").await else { return };
    let c = pod.sleeper("sleeper", "tool").await;
    let before = rss_kib(pod.server.pid());
    // 1 GiB through crictl's stdin, counted by the guest.
    let mut child = pod
        .crictl()
        .args(["exec", "-i", &c, "tool", "count"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let pid = pod.server.pid();
    // The server's resident size is sampled while the data goes through.
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'z'; 1 << 20];
        let mut peak = 0;
        for i in 0..1024 {
            input.write_all(&chunk).unwrap();
            if i % 8 == 0 {
                peak = peak.max(rss_kib(pid));
            }
        }
        peak
    });
    let peak = feeder.join().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), format!("read {} bytes\n", 1u64 << 30));
    // The stream is not held in memory: the server grew by far less than what went through.
    assert!(peak < before + 64 * 1024, "RSS went from {before} KiB to a peak of {peak} KiB for 1 GiB of stdin");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn crictl_port_forward_reaches_a_wasm_server_and_survives_a_closed_port() {
    let Some(mut pod) = Pod::new("pf").await else { return };
    let mut cfg = container_config("web", "http", &[]);
    cfg.command = vec![];
    start(&mut pod.rt, &pod.sandbox, &pod.config, cfg).await;
    let forward = |local: u16, remote: u16, transport: &str| {
        pod.crictl()
            .args(["port-forward", "--transport", transport, &pod.sandbox, &format!("{local}:{remote}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let get = |port: u16| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    };
    let until_listening = |port: u16, child: &mut std::process::Child| {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("crictl port-forward does not listen on {port}: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    for transport in ["spdy", "websocket"] {
        let good = free_port();
        let mut child = forward(good, 8080, transport);
        until_listening(good, &mut child);
        // Several connections through the one forward, each answered by the wasm server.
        for _ in 0..3 {
            let b = get(good).unwrap();
            assert!(b.contains(" 200 ") && b.contains("hello"), "{transport}: {b}");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // A closed port: the error reaches crictl. (client-go then closes the whole connection on
    // its own; that the server keeps serving other streams after a refused one is shown in
    // streaming/tests/server.rs.)
    let closed = free_port();
    let mut child = forward(closed, 9999, "spdy");
    until_listening(closed, &mut child);
    let _ = get(closed);
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("9999") && err.contains("connection refused"), "{err}");
    // The pod is still reachable through a new forward.
    let good = free_port();
    let mut child = forward(good, 8080, "spdy");
    until_listening(good, &mut child);
    assert!(get(good).unwrap().contains(" 200 "));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn urls_are_single_use() {
    let Some(mut pod) = Pod::new("urls").await else { return };
    let c = pod.sleeper("sleeper", "tool").await;
    let url = pod
        .rt
        .exec(cri::ExecRequest {
            container_id: c.clone(),
            cmd: vec!["tool".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let post = |url: &str| -> String {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        write!(
            s,
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        text(&head)
    };
    assert_eq!(post(&url), "HTTP/1.1 101");
    assert_eq!(post(&url), "HTTP/1.1 404");
    // Bad requests are refused with the kubelet's words.
    let e = pod
        .rt
        .exec(cri::ExecRequest { container_id: c.clone(), cmd: vec!["tool".into()], ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.message().contains("one of stdin, stdout, or stderr must be set"), "{e:?}");
    let e = pod
        .rt
        .port_forward(cri::PortForwardRequest { pod_sandbox_id: "nosuch".into(), port: vec![80] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

/// The container's cumulative CPU time, which counts its exec'd instances.
async fn cpu_nanos(rt: &mut RuntimeClient, id: &str) -> u64 {
    let s = rt
        .container_stats(cri::ContainerStatsRequest { container_id: id.to_string() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    s.cpu.unwrap().usage_core_nano_seconds.unwrap().value
}

#[tokio::test]
async fn an_exec_ends_with_its_client_and_with_its_container() {
    let Some(mut pod) = Pod::new("leave").await else { return };
    let c = pod.sleeper("sleeper", "tool").await;
    // A spinning exec counts in its container's CPU time...
    let mut child = pod.crictl().args(["exec", &c, "tool", "loop"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 8];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"looping\n");
    let a = cpu_nanos(&mut pod.rt, &c).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = cpu_nanos(&mut pod.rt, &c).await;
    assert!(b > a + 50_000_000, "a spinning exec adds to its container's CPU time: {a} -> {b}");
    // ...and stops when its client goes away.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut still = u64::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let x = cpu_nanos(&mut pod.rt, &c).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let y = cpu_nanos(&mut pod.rt, &c).await;
        still = y - x;
        if still < 20_000_000 {
            break;
        }
    }
    assert!(still < 20_000_000, "the exec kept running after its client left ({still} ns of CPU in 300 ms)");

    // An exec is killed with its container.
    let mut child = pod
        .crictl()
        .args(["exec", &c, "tool", "sleep", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 15];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"sleeping 600 s\n");
    pod.rt.stop_container(cri::StopContainerRequest { container_id: c.clone(), timeout: 0 }).await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(text(&out.stderr).contains("command terminated with exit code 137"), "{out:?}");
}
