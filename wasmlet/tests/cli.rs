//! The `wasmlet` command line: image import/ls/rm and the README's example pod.

use std::process::{Command, Stdio};

fn wasmlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasmlet"))
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn image_import_ls_rm() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let out = wasmlet()
        .args(["image", "import", &example("hello.wat"), "--tag", "hello:1", "--root", root_arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");

    let out = wasmlet().args(["image", "ls", "--root", root_arg]).output().unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(listing.contains("docker.io/library/hello:1") && listing.contains("module"), "{listing}");
    assert!(listing.contains(&id[7..19]), "{listing}");

    let out = wasmlet().args(["image", "inspect", "hello:1", "--root", root_arg]).output().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["kind"], "module");
    assert_eq!(record["repo_tags"][0], "docker.io/library/hello:1");

    let bad = root.path().join("bad.wat");
    std::fs::write(&bad, "(module (func $x (unknown-instruction)))").unwrap();
    let out = wasmlet().args(["image", "import", bad.to_str().unwrap(), "--root", root_arg]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid WAT"));

    let out = wasmlet().args(["image", "rm", "hello:1", "--root", root_arg]).output().unwrap();
    assert!(out.status.success());
    let out = wasmlet().args(["image", "rm", "hello:1", "--root", root_arg]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("image \"hello:1\" not found"));
}

#[test]
fn readme_cri_tour_pod_runs_through_the_cri_socket() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let socket = root.path().join("cri.sock");
    let out = wasmlet()
        .args(["image", "import", &example("hello.wat"), "--tag", "hello", "--root", root_arg])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Scratch files inside the temporary root, not under /dev/shm: the server is killed below.
    let config = root.path().join("wasmlet.toml");
    std::fs::write(&config, format!("run_dir = {:?}\n", root.path().join("run"))).unwrap();
    let mut server = wasmlet()
        .args(["cri", "--root", root_arg, "--socket", socket.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = wasmlet()
        .args(["pod", "run", "--socket", socket.to_str().unwrap(), "--image", "hello", "--log-dir"])
        .arg(root.path().join("logs"))
        .args(["--", "Ada"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = stdout.lines().next().unwrap_or_default();
    assert!(line.ends_with(" stdout F hello, Ada from wasm"), "{stdout}");
    assert!(stderr.contains("container hello exited with code 0 (Completed)"), "{stderr}");
}

#[test]
fn config_default_is_a_valid_config() {
    let out = wasmlet().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[registries.\"registry.example\"]"));
    // Uncommented, the example keys are accepted by `wasmlet cri --config`.
    let dir = tempfile::tempdir().unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| l.strip_prefix("# ").filter(|l| l.contains('=') || l.starts_with('[')).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        uncommented
            .replace("/var/lib/wasmlet", dir.path().join("root").to_str().unwrap())
            .replace("/run/wasmlet/cri.sock", dir.path().join("cri.sock").to_str().unwrap())
            .replace("/run/wasmlet/pods", dir.path().join("run").to_str().unwrap()),
    )
    .unwrap();
    let mut server =
        wasmlet().args(["cri", "--config", file.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("cri.sock").exists() {
        if let Ok(Some(status)) = server.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("wasmlet cri exited with {status}: {err}");
        }
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The README's first command (examples/demo.sh) in short: every feature the example is there
/// to show appears in the output of `wasmlet run --logs`.
#[test]
fn readme_demo_shows_every_feature() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    for (file, tag) in [("tools.wat", "tools:1"), ("web.wat", "web:1")] {
        let out =
            wasmlet().args(["image", "import", &example(file), "--tag", tag, "--root", root_arg]).output().unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let config = root.path().join("wasmlet.toml");
    std::fs::write(&config, format!("run_dir = {:?}\n", root.path().join("run"))).unwrap();
    // Long enough for the crasher's second restart, which waits out a 10 s back-off.
    let out = wasmlet()
        .args(["run", "--logs", "--stop-after", "14s", "--root", root_arg, "--config", config.to_str().unwrap()])
        .arg(example("demo.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let expect = |what: &str, text: &str| assert!(stdout.contains(text), "{what}: no {text:?} in\n{stdout}\n{stderr}");
    let position = |text: &str| stdout.find(text).unwrap_or_else(|| panic!("no {text:?} in\n{stdout}\n{stderr}"));
    // The init container runs first, alone, and writes to the shared emptyDir.
    expect("init container", "Started container setup");
    assert!(position("Started container setup") < position("Started container web"), "{stdout}");
    // The sidecar starts before the app containers and is stopped after them.
    expect("sidecar", "[demo/ticker] sidecar: still here");
    assert!(position("Started container ticker") < position("Started container web"), "{stdout}");
    assert!(position("Stopping container web") < position("Stopping container ticker"), "{stdout}");
    // The HTTP server: postStart, readiness (READY counts it with the sidecar) and liveness.
    expect("postStart hook", "[demo/web] served /post-start");
    expect("readiness probe", "[demo/web] served /ready");
    expect("liveness probe", "[demo/web] served /healthz");
    expect("ready", "2/3     ");
    // The crasher reads the init container's file, exits 1 and is restarted with back-off.
    expect("shared emptyDir", "[demo/crasher] hello from the init container, through the shared emptyDir");
    expect("back-off", "Back-off restarting failed container crasher in pod demo_default(");
    expect("crash loop", "CrashLoopBackOff");
    let restarts = stdout
        .lines()
        .filter(|l| l.starts_with("demo "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u32>().ok())
        .max();
    assert!(restarts >= Some(2), "restarts {restarts:?}\n{stdout}");
    // --stop-after deletes the pod gracefully: preStop reaches the server before its stop.
    expect("deletion", "deleting 1 pod(s) gracefully (--stop-after)");
    expect("preStop hook", "[demo/web] served /pre-stop");
    assert!(stdout.trim_end().ends_with("pod \"demo\" deleted"), "{stdout}");
}
