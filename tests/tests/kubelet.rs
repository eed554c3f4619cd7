//! `wasmlet run` end to end: real manifests, the real binary, the in-process CRI server and
//! real wasm workloads. Each test reads the live `kubectl get pods -w`-style output.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wasmlet_tests::{
    RegistryServer, free_port, http_component, net_component, output_with_input, push_as, tool_module, wasmlet_bin,
};

/// A `wasmlet run` process with its own root, and its output lines as they come.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

fn setup(manifest: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for (file, tag) in [(tool_module(), "tool:1"), (http_component(), "http:1"), (net_component(), "net:1")] {
        let out = Command::new(wasmlet_bin())
            .args(["image", "import"])
            .arg(file)
            .args(["--tag", tag, "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, manifest).unwrap();
    let config = dir.path().join("wasmlet.toml");
    std::fs::write(&config, format!("run_dir = {:?}\n", run_dir_of(&dir).display().to_string())).unwrap();
    (dir, root, file, config)
}

/// The run dir of the test whose files are in `dir`: in memory, as on a node, and as unique
/// as `dir`.
fn run_dir_of(dir: &tempfile::TempDir) -> PathBuf {
    let name = dir.path().file_name().expect("a temp dir has a name").to_string_lossy();
    PathBuf::from(format!("/dev/shm/wasmlet-run-test-{}", name.trim_start_matches('.')))
}

impl Run {
    fn start(manifest: &str) -> Run {
        let (dir, root, file, config) = setup(manifest);
        Run::spawn(dir, root, config, &["run".into(), file.display().to_string()])
    }

    /// `wasmlet node --pod-manifest-path MANIFESTS`.
    fn node(manifests: &std::path::Path) -> Run {
        let (dir, root, _, config) = setup("");
        Run::spawn(dir, root, config, &["node".into(), "--pod-manifest-path".into(), manifests.display().to_string()])
    }

    fn spawn(dir: tempfile::TempDir, root: PathBuf, config: PathBuf, args: &[String]) -> Run {
        let mut child = Command::new(wasmlet_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        let config = config.clone();
        Run { child, lines: rx, seen: Vec::new(), dir, root, config }
    }

    /// Waits for a line matching `pred`; panics with everything seen after `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {what} within {limit:?}; output:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// A pod status line (`NAME READY STATUS RESTARTS AGE`) whose columns satisfy `pred`.
    fn wait_status(&mut self, pod: &str, limit: Duration, pred: impl Fn(&str, &str, u32) -> bool) -> String {
        self.wait_for(&format!("a matching status line of {pod}"), limit, |l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 5 && f[0] == pod && f[3].parse::<u32>().is_ok_and(|r| pred(f[1], f[2], r))
        })
    }

    fn interrupt(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    }

    /// Waits for the process to end; its exit code and the rest of its output.
    fn finish(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "wasmlet run still running; output:\n{}", self.seen.join("\n"));
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// `wasmlet exec ARGS` against this run, with `input` on its stdin.
    fn exec(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        self.wasmlet("exec", args, input)
    }

    /// `wasmlet COMMAND --root R --config C ARGS` with `input` on its stdin.
    fn wasmlet(&self, command: &str, args: &[&str], input: &[u8]) -> std::process::Output {
        let mut c = Command::new(wasmlet_bin());
        c.arg(command).arg("--root").arg(&self.root).arg("--config").arg(&self.config).args(args);
        output_with_input(&mut c, input).unwrap()
    }

    fn logs(&self, pod: &str, container: &str, previous: bool) -> String {
        let mut cmd = Command::new(wasmlet_bin());
        cmd.args(["logs", pod, "-c", container, "--root"]).arg(&self.root);
        if previous {
            cmd.arg("--previous");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        wasmlet_tests::release_run_dir(&run_dir_of(&self.dir));
    }
}

#[test]
fn init_containers_share_an_empty_dir_and_a_failing_container_backs_off() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  restartPolicy: OnFailure
  initContainers:
  - {name: init, image: "tool:1", args: [write, /data/msg, from-init], volumeMounts: [{name: data, mountPath: /data}]}
  containers:
  - name: crasher
    image: "tool:1"
    args: [exit, "3"]
  - name: reader
    image: "tool:1"
    args: [cat, /data/msg]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes:
  - name: data
    emptyDir: {}
"#,
    );
    let limit = Duration::from_secs(30);
    // The first exit restarts at once; the second one backs off for 10 s. (kubectl's STATUS
    // shows the first container's reason.)
    run.wait_status("web", limit, |_, s, r| s == "CrashLoopBackOff" && r >= 1);
    let out = run.output();
    for needle in [
        "Created container: init",
        "Started container init",
        "Container image \"tool:1\" already present on machine",
        "Back-off restarting failed container crasher in pod web_default(",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // The reader saw what the init container wrote through the shared emptyDir, and the
    // crasher's previous instance is kept for `logs --previous`.
    assert_eq!(run.logs("web", "reader", false).trim(), "from-init");
    run.interrupt();
    let code = run.finish(limit);
    assert_eq!(code, 0, "Ctrl-C ends a run with 0:\n{}", run.output());
    assert!(run.output().contains("deleting 1 pod(s) gracefully"));
}

#[test]
fn never_pods_finish_with_their_phase_and_the_exit_code_says_so() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: job}
spec:
  restartPolicy: Never
  containers:
  - {name: bad, image: "tool:1", args: [exit, "2"]}
  - {name: ok, image: "tool:1", args: [echo, done]}
"#,
    );
    let limit = Duration::from_secs(30);
    run.wait_status("job", limit, |ready, s, r| ready == "0/2" && s == "Error" && r == 0);
    let code = run.finish(limit);
    assert_eq!(code, 1, "a Failed pod makes the run fail:\n{}", run.output());
    assert!(run.logs("job", "ok", false).contains("argv[2]=done"));
}

#[test]
fn liveness_failure_restarts_the_container_and_readiness_follows_a_file() {
    let health = tempfile::tempdir().unwrap();
    let dir = health.path().display().to_string();
    let mut run = Run::start(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: probed}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: "tool:1"
    args: [sleep, "600"]
    volumeMounts: [{{name: state, mountPath: /state}}]
    readinessProbe:
      exec: {{command: [tool, cat, /state/ready]}}
      periodSeconds: 1
    livenessProbe:
      exec: {{command: [tool, cat, /state/alive]}}
      periodSeconds: 1
      failureThreshold: 2
  volumes:
  - name: state
    hostPath: {{path: {dir:?}, type: Directory}}
"#
    ));
    let limit = Duration::from_secs(40);
    std::fs::write(health.path().join("alive"), "ok").unwrap();
    run.wait_status("probed", limit, |ready, s, _| ready == "0/1" && s == "Running");
    // Readiness follows the file both ways.
    std::fs::write(health.path().join("ready"), "ok").unwrap();
    run.wait_status("probed", limit, |ready, s, _| ready == "1/1" && s == "Running");
    std::fs::remove_file(health.path().join("ready")).unwrap();
    run.wait_status("probed", limit, |ready, _, _| ready == "0/1");
    assert!(run.output().contains("Readiness probe failed:"), "{}", run.output());
    // Liveness fails twice in a row: the container is killed and restarted (restartCount 1).
    std::fs::remove_file(health.path().join("alive")).unwrap();
    run.wait_status("probed", limit, |_, _, r| r == 1);
    let out = run.output();
    assert!(out.contains("Container app failed liveness probe, will be restarted"), "{out}");
    assert!(out.contains("Liveness probe failed:"), "{out}");
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
}

#[test]
fn an_invalid_manifest_names_the_field_and_nothing_runs() {
    let (dir, root, file, config) = setup(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: app\n    image: \"tool:1\"\n    ports: [{containerPort: 80, hostPort: 8080}]\n  - name: side\n    image: \"\"\n    ports: [{containerPort: 81, hostPort: 8080}]\n",
    );
    let out = Command::new(wasmlet_bin())
        .arg("run")
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("The Pod \"web\" is invalid: ["), "{err}");
    assert!(err.contains("spec.containers[1].image: Required value"), "{err}");
    assert!(err.contains("spec.containers[1].ports[0].hostPort: Duplicate value: \"8080/TCP\""), "{err}");
    assert!(err.contains("nothing was run"), "{err}");
    assert!(!root.join("kubelet").exists(), "no pod directory was made");
    assert!(out.stdout.is_empty(), "no status line was printed");
    drop(dir);
}

#[test]
fn network_probes_reach_the_pod_and_hooks_run_around_the_container() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let mut run = Run::start(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: net}}
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: web
    image: "http:1"
    ports: [{{name: http, containerPort: 8080}}]
    startupProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
  - name: sock
    image: "net:1"
    args: [serve, "9090"]
    livenessProbe: {{tcpSocket: {{port: 9090}}, periodSeconds: 1}}
    readinessProbe: {{tcpSocket: {{port: 9090}}, periodSeconds: 1}}
  - name: hooks
    image: "tool:1"
    args: [sleep, "600"]
    volumeMounts: [{{name: state, mountPath: /state}}]
    lifecycle:
      postStart: {{exec: {{command: [tool, write, /state/post-start, "done"]}}}}
      preStop: {{exec: {{command: [tool, write, /state/pre-stop, "done"]}}}}
  - name: closed
    image: "tool:1"
    args: [sleep, "600"]
    readinessProbe: {{httpGet: {{port: 8081}}, periodSeconds: 1}}
  volumes:
  - name: state
    hostPath: {{path: {dir:?}}}
"#
    ));
    let limit = Duration::from_secs(40);
    // web (httpGet through its startup gate), sock (tcpSocket) and hooks (no probe) become
    // ready; "closed" probes a port nobody listens on.
    run.wait_status("net", limit, |ready, s, _| ready == "3/4" && s == "Running");
    assert_eq!(std::fs::read_to_string(state.path().join("post-start")).unwrap().trim(), "done");
    run.wait_for("a refused readiness probe", limit, |l| {
        l.contains("pod/net/closed") && l.contains("Readiness probe failed:") && l.contains(":8081")
    });
    assert!(!state.path().join("pre-stop").exists(), "preStop runs only at the stop");
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
    assert_eq!(std::fs::read_to_string(state.path().join("pre-stop")).unwrap().trim(), "done");
    let out = run.output();
    assert!(out.contains("Stopping container hooks"), "{out}");
    assert!(!out.contains("FailedPreStopHook") && !out.contains("FailedPostStartHook"), "{out}");
}

#[test]
fn grpc_probes_follow_the_health_service() {
    // "health" answers NOT_SERVING twice, then SERVING; nothing listens on "closed"'s port.
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: grpc}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: health
    image: "net:1"
    args: [grpc-health, "9090", "2"]
    readinessProbe: {grpc: {port: 9090}, periodSeconds: 1}
  - name: closed
    image: "tool:1"
    args: [sleep, "600"]
    livenessProbe: {grpc: {port: 9091}, periodSeconds: 1, failureThreshold: 2}
"#,
    );
    let limit = Duration::from_secs(40);
    run.wait_for("a NOT_SERVING readiness failure", limit, |l| {
        l.contains("pod/grpc/health")
            && l.contains(r#"Readiness probe failed: service unhealthy (responded with "NOT_SERVING")"#)
    });
    run.wait_status("grpc", limit, |ready, s, _| ready == "2/2" && s == "Running");
    let line = run.wait_for("a refused liveness probe", limit, |l| {
        l.contains("pod/grpc/closed") && l.contains("Liveness probe failed:")
    });
    assert!(
        line.contains("timeout: failed to connect service \"")
            && line.contains(":9091\" within 1s: context deadline exceeded"),
        "{line}"
    );
    run.wait_for("the liveness restart", limit, |l| {
        l.contains("pod/grpc/closed") && l.contains("Container closed failed liveness probe, will be restarted")
    });
    run.wait_status("grpc", limit, |_, _, restarts| restarts >= 1);
    let log = run.logs("grpc", "health", false);
    assert!(log.contains("answered NOT_SERVING\nanswered NOT_SERVING\nanswered SERVING"), "{log}");
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
}

#[test]
fn https_probes_and_hooks_against_a_plain_http_server() {
    // The handler speaks plain HTTP: an HTTPS probe fails as the kubelet's does, an HTTPS
    // hook falls back to HTTP and says so.
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: tls}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: "http:1"
    readinessProbe: {httpGet: {port: 8080, scheme: HTTPS}, periodSeconds: 1}
    lifecycle:
      postStart: {httpGet: {port: 8080, scheme: HTTPS, path: /hook}}
"#,
    );
    let limit = Duration::from_secs(40);
    let line = run.wait_for("the fallback", limit, |l| l.contains("LifecycleHTTPFallback"));
    assert!(
        line.contains("pod/tls/web") && line.contains(":8080 got HTTP response, retry with HTTP succeeded"),
        "{line}"
    );
    let line = run.wait_for("a failed HTTPS probe", limit, |l| l.contains("Readiness probe failed:"));
    assert!(
        line.contains("Get \"https://") && line.ends_with(":8080/\": http: server gave HTTP response to HTTPS client"),
        "{line}"
    );
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
    assert!(!run.output().contains("FailedPostStartHook"), "{}", run.output());
}

#[test]
fn images_are_pulled_with_the_pull_secrets_and_back_off_without_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let registry = rt.block_on(RegistryServer::start_with_htpasswd("ada", "s3cret")).unwrap();
    let image = format!("{}/demo/tool:1", registry.host);
    let out = push_as(tool_module(), &image, "ada", "s3cret");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // "private" pulls with its secret; "nosecret" names a secret that does not exist and pulls
    // (Always) anonymously, which the registry refuses.
    let mut run = Run::start(&format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: regcred}}
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{{"auths": {{"{host}": {{"username": "ada", "password": "s3cret"}}}}}}'
---
apiVersion: v1
kind: Pod
metadata: {{name: private}}
spec:
  restartPolicy: Never
  imagePullSecrets: [{{name: regcred}}]
  containers:
  - {{name: app, image: "{image}", args: [echo, pulled]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: nosecret}}
spec:
  imagePullSecrets: [{{name: missing}}]
  containers:
  - {{name: app, image: "{image}", imagePullPolicy: Always}}
"#,
        host = registry.host
    ));
    let limit = Duration::from_secs(60);
    run.wait_for("the pull back-off", limit, |l| {
        l.contains("pod/nosecret/app") && l.contains(&format!("Back-off pulling image \"{image}\""))
    });
    let out = run.output();
    assert!(
        out.lines().any(|l| l.starts_with("private ") && l.split_whitespace().nth(2) == Some("Completed")),
        "{out}"
    );
    let line = |what: &str, pred: &dyn Fn(&str) -> bool| {
        out.lines().find(|l| pred(l)).unwrap_or_else(|| panic!("no line with {what} in\n{out}")).to_string()
    };
    let pulled = line("the pull", &|l| l.contains("pod/private/app") && l.contains("Successfully pulled"));
    assert!(pulled.contains(&format!("Successfully pulled image \"{image}\" in ")), "{pulled}");
    assert!(pulled.contains(" including waiting). Image size: ") && pulled.ends_with(" bytes."), "{pulled}");
    assert!(run.logs("private", "app", false).contains("argv[2]=pulled"));
    let missing = line("the missing secret", &|l| l.contains("FailedToRetrieveImagePullSecret"));
    assert!(
        missing.contains(" pod/nosecret ")
            && missing.ends_with(
                "Unable to retrieve some image pull secrets (missing); attempting to pull the image may not succeed."
            ),
        "{missing}"
    );
    // The pod's own events: its secrets are read before its pull (the other pod pulls on
    // its own schedule).
    let position = |pred: &dyn Fn(&str) -> bool| out.lines().position(pred);
    let missing_at = position(&|l| l.contains("FailedToRetrieveImagePullSecret"));
    let pulling_at = position(&|l| l.contains("pod/nosecret/app") && l.contains("Pulling image"));
    assert!(missing_at.is_some() && missing_at < pulling_at, "the secrets are read before the pull:\n{out}");
    let refused = line("a refused pull", &|l| l.contains("pod/nosecret/app") && l.contains("Failed to pull image"));
    assert!(refused.contains(&registry.host), "the error names the registry: {refused}");
    assert!(out.contains("ErrImagePull"), "{out}");
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
}

#[test]
fn a_failing_post_start_hook_kills_the_container_and_it_restarts() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: hooked}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: "tool:1"
    args: [sleep, "600"]
    lifecycle:
      postStart: {exec: {command: [tool, exit, "1"]}}
"#,
    );
    let limit = Duration::from_secs(40);
    run.wait_status("hooked", limit, |_, s, r| s == "PostStartHookError" || (s == "CrashLoopBackOff" && r >= 1));
    let out = run.output();
    for needle in ["FailedPostStartHook", "PostStartHook failed"] {
        assert!(out.contains(needle), "missing {needle:?}:\n{out}");
    }
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
}

#[test]
fn sidecars_start_before_the_next_init_container_and_stop_after_the_app() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: job}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: side
    image: "tool:1"
    restartPolicy: Always
    args: [sleep, "600"]
    startupProbe: {exec: {command: [tool, hello]}, periodSeconds: 1}
  - {name: setup, image: "tool:1", args: [hello]}
  containers:
  - {name: app, image: "tool:1", args: [sleep, "2"]}
"#,
    );
    let limit = Duration::from_secs(40);
    // The pod completes by itself: the sidecar does not keep it alive.
    assert_eq!(run.finish(limit), 0, "{}", run.output());
    let out = run.output();
    let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("missing {needle:?}:\n{out}"));
    assert!(at("Started container side") < at("Created container: setup"), "{out}");
    assert!(at("Created container: setup") < at("Created container: app"), "{out}");
    // Stopped last, after the app ended on its own.
    assert!(at("Stopping container side") > at("Started container app"), "{out}");
    assert!(!out.contains("Stopping container app"), "{out}");
}

#[test]
fn a_failed_init_container_fails_a_never_pod_and_is_retried_otherwise() {
    for (policy, never) in [("Never", true), ("OnFailure", false), ("Always", false)] {
        let mut run = Run::start(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: init}}
spec:
  restartPolicy: {policy}
  initContainers:
  - {{name: broken, image: "tool:1", args: [exit, "4"]}}
  containers:
  - {{name: app, image: "tool:1", args: [hello]}}
"#
        ));
        let limit = Duration::from_secs(40);
        if never {
            assert_eq!(run.finish(limit), 1, "{}", run.output());
            assert!(run.output().contains("Init:Error"), "{}", run.output());
        } else {
            run.wait_status("init", limit, |_, s, r| s == "Init:CrashLoopBackOff" && r >= 1);
            run.interrupt();
            assert_eq!(run.finish(limit), 0, "{}", run.output());
        }
        assert!(!run.output().contains("Created container: app"), "{policy}: the app never starts:\n{}", run.output());
    }
}

#[test]
fn config_maps_and_secrets_reach_env_and_volumes() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: conf}
data: {GREETING: hello, app.conf: "mode=fast"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: cfg}
spec:
  restartPolicy: Never
  containers:
  - name: env
    image: "tool:1"
    args: [env]
    envFrom: [{prefix: CFG_, configMapRef: {name: conf}}]
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: conf, key: GREETING}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: MAYBE, valueFrom: {configMapKeyRef: {name: absent, key: x, optional: true}}}
    - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: MSG, value: "$(GREETING) from $(POD)"}
  - name: files
    image: "tool:1"
    args: [cat, /conf/app.conf]
    volumeMounts: [{name: conf, mountPath: /conf}, {name: creds, mountPath: /creds}]
  volumes:
  - {name: conf, configMap: {name: conf}}
  - {name: creds, secret: {secretName: creds}}
"#,
    );
    assert_eq!(run.finish(Duration::from_secs(30)), 0, "{}", run.output());
    let env = run.logs("cfg", "env", false);
    for line in ["GREETING=hello", "PASSWORD=s3cret", "CFG_app.conf=mode=fast", "POD=cfg", "MSG=hello from cfg"] {
        assert!(env.lines().any(|l| l == line), "missing {line:?} in:\n{env}");
    }
    assert!(!env.contains("MAYBE="), "{env}");
    assert_eq!(run.logs("cfg", "files", false).trim(), "mode=fast");
}

#[test]
fn a_missing_config_map_is_a_create_container_config_error() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: cfg}
spec:
  containers:
  - name: app
    image: "tool:1"
    args: [hello]
    env: [{name: X, valueFrom: {configMapKeyRef: {name: nope, key: x}}}]
"#,
    );
    run.wait_status("cfg", Duration::from_secs(30), |_, s, _| s == "CreateContainerConfigError");
    assert!(run.output().contains("Error: configmap \"nope\" not found"), "{}", run.output());
    run.interrupt();
    assert_eq!(run.finish(Duration::from_secs(30)), 0);
}

#[test]
fn a_startup_probe_holds_off_liveness_and_exec_probes_time_out() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let mut run = Run::start(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: slow}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: "tool:1"
    args: [sleep, "600"]
    volumeMounts: [{{name: state, mountPath: /state}}]
    startupProbe: {{exec: {{command: [tool, cat, /state/started]}}, periodSeconds: 1, failureThreshold: 60}}
    livenessProbe: {{exec: {{command: [tool, cat, /state/alive]}}, periodSeconds: 1, failureThreshold: 1}}
  - name: timer
    image: "tool:1"
    args: [sleep, "600"]
    readinessProbe: {{exec: {{command: [tool, sleep, "5"]}}, timeoutSeconds: 1, periodSeconds: 2}}
  volumes:
  - name: state
    hostPath: {{path: {dir:?}}}
"#
    ));
    let limit = Duration::from_secs(40);
    run.wait_for("an exec probe timing out", limit, |l| {
        l.contains("pod/slow/timer") && l.contains("Readiness probe failed: command \"tool sleep 5\" timed out")
    });
    // Several startup failures, and liveness (which would fail at once) has not run.
    run.wait_for("startup probe failures", limit, |l| l.contains("Startup probe failed:"));
    run.wait_for("more startup probe failures", limit, |l| l.contains("Startup probe failed:"));
    assert!(!run.output().contains("Liveness probe failed"), "{}", run.output());
    std::fs::write(state.path().join("started"), "yes").unwrap();
    run.wait_status("slow", limit, |_, _, r| r == 1);
    let out = run.output();
    assert!(out.contains("Container app failed liveness probe, will be restarted"), "{out}");
    run.interrupt();
    assert_eq!(run.finish(limit), 0, "{}", run.output());
}

#[test]
fn active_deadline_fails_the_pod() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: late}
spec:
  activeDeadlineSeconds: 2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: "tool:1", args: [sleep, "600"]}
"#,
    );
    assert_eq!(run.finish(Duration::from_secs(30)), 1, "{}", run.output());
    let out = run.output();
    assert!(
        out.contains("DeadlineExceeded")
            && out.contains("Pod was active on the node longer than the specified deadline"),
        "{out}"
    );
}

#[test]
fn static_pods_follow_their_directory() {
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = manifests.path().join("web.yaml");
    let manifest = |version: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: app
    image: "tool:1"
    args: [sleep, "600"]
    env: [{{name: VERSION, value: "{version}"}}]
    volumeMounts: [{{name: state, mountPath: /state}}]
    lifecycle:
      preStop: {{exec: {{command: [tool, write, "/state/stopped-{version}", "yes"]}}}}
  volumes:
  - name: state
    hostPath: {{path: {:?}}}
"#,
            state.path().display().to_string()
        )
    };
    std::fs::write(&file, manifest("1")).unwrap();
    let mut node = Run::node(manifests.path());
    let limit = Duration::from_secs(40);
    let running = |l: &str| l.contains("pod status") && l.contains("status=Running");
    let added = |l: &str| l.contains("pod added") && l.contains("source=\"file\"") && l.contains("pod=default/web-");
    node.wait_for("the pod added", limit, added);
    node.wait_for("the pod running", limit, running);
    // A change is a new pod: the old one stops gracefully (its preStop runs) and the new one
    // starts.
    std::fs::write(&file, manifest("2")).unwrap();
    node.wait_for("the change", limit, |l| l.contains("pod deleted: terminating it"));
    // The new pod is added and the old one ends, in either order (a plain guest stops at
    // once, and the directory may be read while the file is rewritten).
    let (mut new_added, mut old_gone) = (false, false);
    while !(new_added && old_gone) {
        let l = node
            .wait_for("the new pod added and the old one gone", limit, |l| added(l) || l.contains("pod terminated"));
        if added(&l) {
            new_added = true;
        } else {
            old_gone = true;
        }
    }
    assert!(state.path().join("stopped-1").exists(), "the old pod's preStop ran:\n{}", node.output());
    // A broken manifest is refused, naming the field; the rest keeps running.
    std::fs::write(
        manifests.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers: [{name: x}]\n",
    )
    .unwrap();
    node.wait_for("the refusal", limit, |l| {
        l.contains("static pod manifest refused") && l.contains("spec.containers[0].image: Required value")
    });
    // Removing the file terminates the pod.
    std::fs::remove_file(&file).unwrap();
    node.wait_for("the removal", limit, |l| l.contains("pod terminated"));
    assert!(state.path().join("stopped-2").exists(), "{}", node.output());
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(node.finish(limit), 0, "{}", node.output());
}

#[test]
fn wasmlet_exec_runs_commands_in_a_running_pod() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: shell}
spec:
  containers:
  - {name: app, image: "tool:1", args: [sleep, "600"]}
  - {name: side, image: "tool:1", args: [sleep, "600"]}
"#,
    );
    run.wait_status("shell", Duration::from_secs(30), |ready, s, _| ready == "2/2" && s == "Running");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let out = run.exec(&["shell", "-c", "app", "--", "tool", "stderr", "oops"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!((text(&out.stdout).as_str(), text(&out.stderr).as_str()), ("to stdout\n", "oops\n"));
    let out = run.exec(&["shell", "-c", "side", "--", "tool", "exit", "7"], b"");
    assert_eq!(out.status.code(), Some(7), "the command's exit code is wasmlet exec's: {out:?}");
    let out = run.exec(&["shell", "-c", "app", "-i", "--", "tool", "stdin"], b"piped in");
    assert_eq!(text(&out.stdout), "piped in", "{out:?}");
    let out = run.exec(&["shell", "--", "tool", "hello"], b"");
    assert!(!out.status.success() && text(&out.stderr).contains("several containers (app, side)"), "{out:?}");
    let out = run.exec(&["nosuch", "--", "tool"], b"");
    assert!(!out.status.success() && text(&out.stderr).contains("no running container of pod \"nosuch\""), "{out:?}");
    let out = run.exec(&["shell", "-c", "app", "--", "/no/such"], b"");
    assert!(!out.status.success() && text(&out.stderr).contains("no such file or directory"), "{out:?}");
    run.interrupt();
    run.finish(Duration::from_secs(30));
}

#[test]
fn wasmlet_attach_port_forward_and_logs_with_kubectls_flags() {
    let mut run = Run::start(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: io}
spec:
  restartPolicy: Never
  containers:
  - {name: typist, image: "tool:1", args: [stdin], stdin: true, stdinOnce: true}
  - {name: web, image: "net:1", args: [serve, "8080"]}
  - {name: printer, image: "tool:1", args: [echo, one, two]}
"#,
    );
    // The printer has run and ended; the other two run.
    run.wait_status("io", Duration::from_secs(30), |ready, _, _| ready == "2/3");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // attach: the container's stdin and output.
    let out = run.wasmlet("attach", &["io", "-c", "typist", "-i"], b"typed to attach\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "typed to attach\n");
    // port-forward to the server on the pod's loopback.
    let local = free_port();
    let mut pf = Command::new(wasmlet_bin())
        .args(["port-forward", "io", &format!("{local}:8080"), "--root"])
        .arg(&run.root)
        .arg("--config")
        .arg(&run.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        use std::io::{Read, Write};
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", local)) {
            c.write_all(b"through the forward").unwrap();
            let mut a = String::new();
            let _ = c.read_to_string(&mut a);
            if !a.is_empty() {
                break a;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no answer through wasmlet port-forward");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = pf.kill();
    let pf_out = pf.wait_with_output().unwrap();
    assert_eq!(answer, "io got through the forward", "{}", text(&pf_out.stderr));
    assert!(text(&pf_out.stdout).contains(&format!("Forwarding from 127.0.0.1:{local} -> 8080")));
    // logs, with kubectl's flags.
    let logs = |args: &[&str]| {
        let mut cmd = Command::new(wasmlet_bin());
        cmd.args(["logs", "io", "-c", "printer", "--root"]).arg(&run.root).args(args);
        cmd.output().unwrap()
    };
    let all = "argv[0]=printer\nargv[1]=echo\nargv[2]=one\nargv[3]=two\n";
    assert_eq!(text(&logs(&[]).stdout), all);
    assert_eq!(text(&logs(&["--tail", "2"]).stdout), "argv[2]=one\nargv[3]=two\n");
    assert_eq!(text(&logs(&["--tail", "0"]).stdout), "");
    assert_eq!(text(&logs(&["--limit-bytes", "5"]).stdout), "argv[");
    assert_eq!(text(&logs(&["--since", "1h"]).stdout), all);
    assert_eq!(text(&logs(&["--since-time", "2999-01-01T00:00:00Z"]).stdout), "");
    let stamped = text(&logs(&["--timestamps", "--tail", "1"]).stdout);
    assert!(stamped.starts_with("20") && stamped.ends_with("Z argv[3]=two\n"), "{stamped}");
    let bad = logs(&["--since", "soon"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("--since \"soon\""), "{bad:?}");
    let bad = logs(&["--since", "1h", "--since-time", "2026-01-01T00:00:00Z"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("at most one of sinceTime or sinceSeconds"), "{bad:?}");
    run.interrupt();
    run.finish(Duration::from_secs(30));
}
