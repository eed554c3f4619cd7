//! Real workloads through the real server: exact CRI log records, truthful exit codes and
//! reasons, mounts (read-only refused), ExecSync, stop by timeout, logs rotation, memory limits.

use std::path::Path;
use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// A server with the tool module (`tool`) and component (`toolc`) imported and one sandbox.
struct Pod {
    server: Server,
    rt: RuntimeClient,
    sandbox: String,
    config: cri::PodSandboxConfig,
}

impl Pod {
    async fn new(name: &str) -> Pod {
        let server = Server::start().await.unwrap();
        server.import(tool_module(), "tool").unwrap();
        server.import(tool_component(), "toolc").unwrap();
        let mut rt = server.runtime().await;
        let config = sandbox_config(&server, name);
        let sandbox = run_sandbox(&mut rt, &config).await.unwrap();
        Pod { server, rt, sandbox, config }
    }

    async fn create(&mut self, config: cri::ContainerConfig) -> Result<String, tonic::Status> {
        create(&mut self.rt, &self.sandbox, &self.config, config).await
    }

    async fn start(&mut self, id: &str) {
        self.rt.start_container(cri::StartContainerRequest { container_id: id.to_string() }).await.unwrap();
    }

    /// Creates, starts and waits for the end of a container; returns its status and log.
    async fn run(&mut self, config: cri::ContainerConfig) -> (cri::ContainerStatus, Vec<LogRecord>) {
        let id = self.create(config).await.unwrap();
        self.start(&id).await;
        let s = wait_exited(&mut self.rt, &id, WAIT).await.unwrap();
        let log = read_log(Path::new(&s.log_path)).unwrap();
        (s, log)
    }
}

fn tool(name: &str, image: &str, args: &[&str]) -> cri::ContainerConfig {
    container_config(name, image, args)
}

#[tokio::test]
async fn hello_module_and_component_log_exact_lines() {
    let mut pod = Pod::new("hello").await;
    for (image, n) in [("tool", 1), ("toolc", 1), ("tool", 2), ("toolc", 2)] {
        let (s, log) = pod.run(tool(&format!("hello-{image}-{n}"), image, &["hello"])).await;
        assert_eq!((s.exit_code, s.reason.as_str(), s.message.as_str()), (0, "Completed", ""), "{image}");
        assert_eq!(
            log,
            [LogRecord {
                timestamp: log[0].timestamp.clone(),
                stream: "stdout".into(),
                tag: "F".into(),
                text: "hello from wasm".into()
            }],
            "{image}"
        );
    }
    // Each image was compiled once: the second container of an image reuses its code.
    assert_eq!(pod.server.server_log().matches("compiled wasm").count(), 2, "{}", pod.server.server_log());
}

#[tokio::test]
async fn args_env_and_streams() {
    let mut pod = Pod::new("args").await;
    let mut cfg = tool("echo", "tool", &["echo", "two words", ""]);
    cfg.envs = vec![
        cri::KeyValue { key: "GREETING".into(), value: "hi there".into() },
        cri::KeyValue { key: "EMPTY".into(), value: "".into() },
    ];
    let (s, log) = pod.run(cfg).await;
    assert_eq!(s.exit_code, 0);
    assert_eq!(texts(&log, "stdout"), ["argv[0]=tool", "argv[1]=echo", "argv[2]=two words", "argv[3]="]);

    let mut cfg = tool("env", "toolc", &["env"]);
    cfg.envs = vec![cri::KeyValue { key: "GREETING".into(), value: "hi there".into() }];
    let (_, log) = pod.run(cfg).await;
    assert_eq!(texts(&log, "stdout"), ["GREETING=hi there", "HOSTNAME=args"]);

    // No command: argv[0] is the container's name and args follow.
    let mut cfg = tool("named", "tool", &["echo", "x"]);
    cfg.command.clear();
    let (_, log) = pod.run(cfg).await;
    assert_eq!(texts(&log, "stdout"), ["argv[0]=named", "argv[1]=echo", "argv[2]=x"]);

    let (_, log) = pod.run(tool("err", "tool", &["stderr", "to stderr"])).await;
    assert_eq!(texts(&log, "stderr"), ["to stderr"]);
    assert_eq!(texts(&log, "stdout"), ["to stdout"]);
}

#[tokio::test]
async fn exit_codes_and_reasons_are_truthful() {
    let mut pod = Pod::new("exits").await;
    // A component's exit status is what wasi:cli/exit carries: success or failure (0 or 1).
    for (image, seven) in [("tool", 7), ("toolc", 1)] {
        let (s, log) = pod.run(tool(&format!("seven-{image}"), image, &["exit", "7"])).await;
        assert_eq!((s.exit_code, s.reason.as_str()), (seven, "Error"), "{image}");
        assert_eq!(texts(&log, "stdout"), ["exiting with 7"]);

        let (s, log) = pod.run(tool(&format!("trap-{image}"), image, &["trap"])).await;
        assert_eq!((s.exit_code, s.reason.as_str()), (134, "Error"), "{image}");
        assert!(s.message.contains("wasm trap") && s.message.contains("unreachable"), "{image}: {}", s.message);
        assert_eq!(texts(&log, "stdout"), ["about to trap"]);

        let (s, _) = pod.run(tool(&format!("usage-{image}"), image, &["no-such-command"])).await;
        assert_eq!((s.exit_code, s.reason.as_str()), (if image == "tool" { 2 } else { 1 }, "Error"), "{image}");
    }
}

#[tokio::test]
async fn long_and_unterminated_lines() {
    let mut pod = Pod::new("lines").await;
    let (_, log) = pod.run(tool("long", "tool", &["long", "40000"])).await;
    let out: Vec<(&str, usize)> = log.iter().map(|r| (r.tag.as_str(), r.text.len())).collect();
    assert_eq!(out, [("P", 16384), ("P", 16384), ("F", 40000 - 2 * 16384), ("F", 3)]);
    assert!(log[..3].iter().all(|r| r.text.bytes().all(|b| b == b'x')));
    assert_eq!(log[3].text, "end");

    let (_, log) = pod.run(tool("partial", "tool", &["partial"])).await;
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].tag.as_str(), log[0].text.as_str()), ("F", "no newline at the end"));
}

#[tokio::test]
async fn mounts_read_write_and_read_only() {
    let mut pod = Pod::new("mounts").await;
    let rw = pod.server.dir.path().join("rw");
    let ro = pod.server.dir.path().join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("in.txt"), "from the host\n").unwrap();
    // A symlinked host path is followed.
    let link = pod.server.dir.path().join("rw-link");
    std::os::unix::fs::symlink(&rw, &link).unwrap();
    let mounts = vec![
        cri::Mount { container_path: "/data".into(), host_path: link.display().to_string(), ..Default::default() },
        cri::Mount {
            container_path: "/config".into(),
            host_path: ro.display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    for image in ["tool", "toolc"] {
        let mut cfg = tool(&format!("writer-{image}"), image, &["write", "/data/out.txt", image]);
        cfg.mounts = mounts.clone();
        let (s, log) = pod.run(cfg).await;
        assert_eq!(s.exit_code, 0, "{image}: {log:?}");
        assert_eq!(std::fs::read_to_string(rw.join("out.txt")).unwrap(), image);
        assert_eq!(s.mounts.len(), 2);
        assert!(s.mounts[1].readonly);

        let mut cfg = tool(&format!("reader-{image}"), image, &["cat", "/config/in.txt"]);
        cfg.mounts = mounts.clone();
        let (s, log) = pod.run(cfg).await;
        assert_eq!(s.exit_code, 0);
        assert_eq!(texts(&log, "stdout"), ["from the host"]);

        let mut cfg = tool(&format!("ro-writer-{image}"), image, &["write", "/config/in.txt", "overwritten"]);
        cfg.mounts = mounts.clone();
        let (s, log) = pod.run(cfg).await;
        assert_eq!(s.exit_code, 1, "{image}: write to a read-only mount must fail");
        let err = texts(&log, "stderr").join("\n");
        assert!(err.starts_with("open /config/in.txt for writing:"), "{image}: {err}");
        assert_eq!(std::fs::read_to_string(ro.join("in.txt")).unwrap(), "from the host\n");

        // Nothing outside the mounts is reachable.
        let mut cfg = tool(&format!("escape-{image}"), image, &["cat", "/data/../../etc/passwd"]);
        cfg.mounts = mounts.clone();
        let (s, _) = pod.run(cfg).await;
        assert_eq!(s.exit_code, 1, "{image}");
    }
}

#[tokio::test]
async fn stop_ends_plain_guests_at_once_and_closes_a_servers_listeners() {
    let mut pod = Pod::new("stop").await;
    pod.server.import(net_component(), "net").unwrap();
    // A guest that cannot observe a stop ends at once, as a process without a SIGTERM handler
    // does at SIGTERM: 143, with a long grace period still to run. A spinning module, and
    // sleeping guests blocked in a host call (a component, and a preview 1 module whose
    // single-timer poll_oneoff must not hold its thread).
    for (name, image, args) in [
        ("looper", "tool", &["loop"][..]),
        ("long-sleeper", "toolc", &["sleep", "3600"]),
        ("p1-sleeper", "tool", &["sleep", "3600"]),
    ] {
        let id = pod.create(tool(name, image, args)).await.unwrap();
        pod.start(&id).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        pod.rt.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 3600 }).await.unwrap();
        let s = status(&mut pod.rt, &id).await.unwrap();
        assert_eq!(
            (s.state, s.exit_code, s.reason.as_str()),
            (cri::ContainerState::ContainerExited as i32, 143, "Error"),
            "{name}"
        );
        assert!(s.message.contains("cannot observe a stop request"), "{name}: {}", s.message);
    }
    // A guest that listens on a socket can observe the stop: its listeners are closed (its
    // accept fails), and a server that ends then exits by itself, long before its timeout.
    let server = pod.create(net_config("server", &["serve", "7070"])).await.unwrap();
    pod.start(&server).await;
    wait_log(&mut pod.rt, &server, "listening", Duration::from_secs(10)).await.unwrap();
    let asked = std::time::Instant::now();
    pod.rt.stop_container(cri::StopContainerRequest { container_id: server.clone(), timeout: 20 }).await.unwrap();
    let s = status(&mut pod.rt, &server).await.unwrap();
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{}\n{}", s.message, pod.server.server_log());
    assert!(asked.elapsed() < Duration::from_secs(30), "ended by itself, not at the timeout");
    wait_log(&mut pod.rt, &server, "listener closed", Duration::from_secs(10)).await.unwrap();
    // One that ignores its closed listener gets the timeout, then is killed (137).
    let stubborn = pod.create(net_config("stubborn", &["serve", "7071", "stubborn"])).await.unwrap();
    pod.start(&stubborn).await;
    wait_log(&mut pod.rt, &stubborn, "listening", Duration::from_secs(10)).await.unwrap();
    pod.rt.stop_container(cri::StopContainerRequest { container_id: stubborn.clone(), timeout: 1 }).await.unwrap();
    let s = status(&mut pod.rt, &stubborn).await.unwrap();
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "Error"));
    assert!(s.message.contains("still running 1s after the stop request"), "{}", s.message);
    assert!(s.finished_at - s.started_at >= 1_000_000_000, "the server had its timeout");
    wait_log(&mut pod.rt, &stubborn, "listener closed", Duration::from_secs(10)).await.unwrap();
    // A timeout of 0 kills at once.
    let looper = pod.create(tool("looper-0", "tool", &["loop"])).await.unwrap();
    pod.start(&looper).await;
    pod.rt.stop_container(cri::StopContainerRequest { container_id: looper.clone(), timeout: 0 }).await.unwrap();
    assert_eq!(status(&mut pod.rt, &looper).await.unwrap().exit_code, 137);
}

#[tokio::test]
async fn exec_sync_output_exit_codes_and_timeout() {
    let mut pod = Pod::new("exec").await;
    let tools = pod.server.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::copy(tool_component(), tools.join("other.wasm")).unwrap();
    let mut cfg = tool("svc", "tool", &["loop"]);
    cfg.mounts = vec![cri::Mount {
        container_path: "/tools".into(),
        host_path: tools.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    cfg.envs = vec![cri::KeyValue { key: "MODE".into(), value: "exec".into() }];
    let id = pod.create(cfg).await.unwrap();

    let execer = pod.rt.clone();
    let exec = |cmd: &[&str], timeout: i64| {
        let mut rt = execer.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        };
        async move { rt.exec_sync(req).await.map(|r| r.into_inner()) }
    };
    let e = exec(&["tool", "hello"], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "not running yet: {}", e.message());

    pod.start(&id).await;
    let r = exec(&["tool", "echo", "a b"], 5).await.unwrap();
    assert_eq!(String::from_utf8(r.stdout).unwrap(), "argv[0]=tool\nargv[1]=echo\nargv[2]=a b\n");
    assert_eq!(r.exit_code, 0);
    let r = exec(&["tool", "env"], 5).await.unwrap();
    assert_eq!(String::from_utf8(r.stdout).unwrap(), "MODE=exec\nHOSTNAME=exec\n");
    let r = exec(&["tool", "stderr", "oops"], 5).await.unwrap();
    assert_eq!((r.stdout.as_slice(), r.stderr.as_slice()), (&b"to stdout\n"[..], &b"oops\n"[..]));
    let r = exec(&["tool", "exit", "9"], 5).await.unwrap();
    assert_eq!(r.exit_code, 9);
    // Any status a byte holds, as a process's (wasmtime-wasi alone refuses 126 and more).
    let r = exec(&["tool", "exit", "200"], 5).await.unwrap();
    assert_eq!(r.exit_code, 200, "{}", String::from_utf8_lossy(&r.stderr));
    let r = exec(&["tool", "trap"], 5).await.unwrap();
    assert_eq!(r.exit_code, 134);
    assert!(String::from_utf8_lossy(&r.stderr).contains("wasm trap"));
    // cmd[0] naming a .wasm file the container sees runs that file.
    let r = exec(&["/tools/other.wasm", "echo", "via file"], 5).await.unwrap();
    assert_eq!(String::from_utf8(r.stdout).unwrap(), "argv[0]=/tools/other.wasm\nargv[1]=echo\nargv[2]=via file\n");

    let e = exec(&["tool", "loop"], 1).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(e.message().contains("timed out after 1s"), "{}", e.message());
    let e = exec(&[], 1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // The container itself is untouched by all of this.
    let s = status(&mut pod.rt, &id).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
}

#[tokio::test]
async fn reopen_log_after_rotation() {
    let mut pod = Pod::new("rotate").await;
    let id = pod.create(tool("rot", "tool", &["sleep", "2"])).await.unwrap();
    pod.start(&id).await;
    let log_path = status(&mut pod.rt, &id).await.unwrap().log_path;
    let path = Path::new(&log_path);
    let deadline = std::time::Instant::now() + WAIT;
    while read_log(path).map(|l| l.is_empty()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "no first line");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rotated = path.with_extension("log.1");
    std::fs::rename(path, &rotated).unwrap();
    pod.rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: id.clone() }).await.unwrap();
    wait_exited(&mut pod.rt, &id, WAIT).await.unwrap();
    assert_eq!(texts(&read_log(&rotated).unwrap(), "stdout"), ["sleeping 2 s"]);
    assert_eq!(texts(&read_log(path).unwrap(), "stdout"), ["slept"]);
    let e = pod.rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn memory_limit_ends_the_container_as_oom_killed() {
    let mut pod = Pod::new("oom").await;
    let mut cfg = tool("hog", "tool", &["grow", "64"]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 8 << 20, ..Default::default() }),
        security_context: None,
    });
    let (s, _) = pod.run(cfg).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"));
    assert!(s.message.contains("8388608"), "{}", s.message);
    let (s, log) = pod.run(tool("fine", "tool", &["grow", "16"])).await;
    assert_eq!(s.exit_code, 0);
    assert_eq!(texts(&log, "stdout"), ["grew 16 MiB"]);
}

/// The conformance userland (`workloads/box.c`), the programs critest's images hold: its
/// shell's grammar, and the programs it runs in the same instance.
#[tokio::test]
async fn the_conformance_userland_runs_shell_scripts() {
    let mut pod = Pod::new("userland").await;
    pod.server.import(box_module(), "box").unwrap();
    let data = pod.server.dir.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("b.txt"), "bee\n").unwrap();
    std::fs::write(data.join(".hidden"), "").unwrap();
    let mut cfg = container_config("shell", "box", &[]);
    // Its stdin stays open: `sh` waits for commands, as busybox's does in a pod.
    cfg.command = vec!["sh".into()];
    cfg.stdin = true;
    cfg.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: data.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let id = pod.create(cfg).await.unwrap();
    pod.start(&id).await;
    let mut rt = pod.rt.clone();
    let sh = |script: &str| {
        let req = cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 10,
        };
        let mut rt = rt.clone();
        async move {
            let r = rt.exec_sync(req).await.unwrap().into_inner();
            (String::from_utf8(r.stdout).unwrap(), String::from_utf8(r.stderr).unwrap(), r.exit_code)
        }
    };
    let ok = |out: &str| (out.to_string(), String::new(), 0);
    assert_eq!(sh("echo -n a; echo b c").await, ok("ab c\n"));
    assert_eq!(sh("true && echo and; false && echo no; false || echo or; true || echo no").await, ok("and\nor\n"));
    assert_eq!(sh("false; echo $?; exit 7").await, ("1\n".into(), String::new(), 7));
    assert_eq!(sh("n=x; while true; do echo \"in $n\"; exit 0; done").await, ok("in x\n"));
    assert_eq!(sh("until false; do echo once; break_out=1; exit 3; done").await.2, 3);
    assert_eq!(sh("if false; then echo no; else echo 'else $n'; fi").await, ok("else $n\n"));
    assert_eq!(sh("ls -A /data; ls /data; cat /data/b.txt").await, ok(".hidden\nb.txt\nsub\nb.txt\nsub\nbee\n"));
    assert_eq!(sh("hostname").await, ok("userland\n"));
    assert_eq!(sh("pgrep sleep || echo none; sleep 0.1").await, ok("none\n"));
    let (_, err, code) = sh("nosuch arg").await;
    assert_eq!((err.as_str(), code), ("sh: nosuch: not found\n", 127));
    let (_, err, code) = sh("while true; do echo").await;
    assert!(err.contains("unexpected end of file") && code == 2, "{err} {code}");
    let (_, err, code) = sh("cat /data/missing").await;
    assert!(err.contains("/data/missing") && code == 1, "{err} {code}");
    // Programs by name through PATH-less exec (the container's own program, argv[0] picks).
    let r = rt
        .exec_sync(cri::ExecSyncRequest { container_id: id.clone(), cmd: vec!["echo".into(), "hi".into()], timeout: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"hi\n");
}
