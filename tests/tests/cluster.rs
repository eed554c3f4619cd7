//! `wasmlet node` against a real control plane (../shared/k8s): the Node, its Lease and
//! status, and workloads placed on it by the real scheduler. Every test has a node and a
//! namespace of its own on the one control plane of this test binary.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use wasmlet_tests::cluster::{ControlPlane, NODE_MONITOR_GRACE, Proxy, SIGNING_DURATION, WasmletNode, node_condition};
use wasmlet_tests::{examples_dir, http_component, tool_module};

const FAST: &str = "[node]\nnodeLeaseDurationSeconds = 8\nnodeStatusUpdateFrequency = \"2s\"\n";

fn web() -> std::path::PathBuf {
    examples_dir().join("web.wat")
}

fn pods(cp: &ControlPlane, ns: &str, selector: &str) -> Result<Vec<Value>> {
    let list = cp.get_json(&["get", "pods", "-n", ns, "-l", selector])?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn wait_node_ready(cp: &ControlPlane, node: &WasmletNode) -> Result<Value> {
    let mut last = Value::Null;
    cp.wait(&format!("node {} Ready", node.name), Duration::from_secs(60), || {
        let Some(n) = cp.get_opt_json(&["get", "node", &node.name])? else { return Ok(false) };
        last = n;
        Ok(node_condition(&last, "Ready").as_deref() == Some("True"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    Ok(last)
}

/// A Deployment of the wasm web server pinned to `node` through the RuntimeClass and its
/// host name.
fn deployment(name: &str, node: &str, image: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  strategy: {{rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      runtimeClassName: wasmlet
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      terminationGracePeriodSeconds: 600
      containers:
      - name: web
        image: {image}
        imagePullPolicy: IfNotPresent
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /ready, port: http}}
          periodSeconds: 1
        lifecycle:
          preStop:
            httpGet: {{path: /pre-stop, port: http}}
"#
    )
}

fn wait_ready_replicas(cp: &ControlPlane, ns: &str, app: &str, n: usize, node: &WasmletNode) -> Result<()> {
    cp.wait(&format!("{n} ready pods of {app}"), Duration::from_secs(90), || {
        let all = pods(cp, ns, &format!("app={app}"))?;
        let live: Vec<&Value> = all.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).collect();
        Ok(all.len() == n && live.iter().all(|p| ready(p) && p["status"]["phase"] == "Running"))
    })
    .map_err(|e| {
        anyhow::anyhow!("{e}\npods: {:?}\n{}", cp.kubectl_ok(&["get", "pods", "-n", ns, "-o", "wide"]), node.log())
    })
}

#[test]
fn node_registers_ready_renews_its_lease_and_goes_not_ready_when_it_stops() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let mut node = WasmletNode::start(cp, "wasm-node-reg", &[], FAST)?;
    let n = wait_node_ready(cp, &node)?;
    let labels = &n["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/hostname"], "wasm-node-reg");
    assert_eq!(labels["kubernetes.io/os"], "linux");
    assert!(labels["kubernetes.io/arch"].is_string());
    assert_eq!(labels["wasmlet.dev/wasm"], "true");
    let taints = n["spec"]["taints"].as_array().cloned().unwrap_or_default();
    assert!(
        taints.iter().any(|t| t["key"] == "wasmlet.dev/wasm" && t["effect"] == "NoSchedule"),
        "the default taint: {taints:?}"
    );
    for key in ["cpu", "memory", "pods", "ephemeral-storage"] {
        assert!(n["status"]["capacity"][key].is_string(), "capacity {key}: {}", n["status"]);
        assert!(n["status"]["allocatable"][key].is_string(), "allocatable {key}");
    }
    assert_eq!(n["status"]["capacity"]["pods"], "110");
    let info = &n["status"]["nodeInfo"];
    assert!(info["containerRuntimeVersion"].as_str().unwrap().starts_with("wasmlet://"), "{info}");
    assert_eq!(info["kubeletVersion"], "v1.33.0");
    assert_eq!(info["operatingSystem"], "linux");
    let addresses = n["status"]["addresses"].to_string();
    assert!(
        addresses.contains("InternalIP") && addresses.contains("127.0.0.1") && addresses.contains("Hostname"),
        "{addresses}"
    );
    assert_eq!(n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], node.port);
    for kind in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert_eq!(node_condition(&n, kind).as_deref(), Some("False"), "{kind}");
    }
    // `kubectl get nodes` shows it Ready.
    let table = cp.kubectl_ok(&["get", "node", "wasm-node-reg"])?;
    assert!(table.contains(" Ready "), "{table}");

    // The Lease is held by the node and renewed (every 8/4 = 2 s here).
    let lease = || -> Result<Value> { cp.get_json(&["get", "lease", "-n", "kube-node-lease", "wasm-node-reg"]) };
    let mut first = Value::Null;
    cp.wait("the node's Lease", Duration::from_secs(30), || {
        first = lease().unwrap_or(Value::Null);
        Ok(!first.is_null())
    })?;
    assert_eq!(first["spec"]["holderIdentity"], "wasm-node-reg");
    assert_eq!(first["spec"]["leaseDurationSeconds"], 8);
    assert_eq!(first["metadata"]["ownerReferences"][0]["kind"], "Node");
    let t0 = first["spec"]["renewTime"].as_str().unwrap().to_string();
    cp.wait("the Lease renewed", Duration::from_secs(20), || {
        Ok(lease()?["spec"]["renewTime"].as_str().is_some_and(|t| t > t0.as_str()))
    })?;

    // Stopped, it stops renewing: the node-lifecycle controller marks it NotReady (Unknown).
    node.kill9();
    cp.wait("the node NotReady after wasmlet stopped", NODE_MONITOR_GRACE + Duration::from_secs(30), || {
        let n = cp.get_json(&["get", "node", "wasm-node-reg"])?;
        Ok(node_condition(&n, "Ready").as_deref() == Some("Unknown"))
    })?;

    // Started again on the same root, it adopts its Node and is Ready again.
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    // A Node deleted by an admin is registered again.
    cp.kubectl_ok(&["delete", "node", "wasm-node-reg"])?;
    cp.wait("the node registered again", Duration::from_secs(30), || {
        Ok(cp.kubectl(&["get", "node", "wasm-node-reg"])?.status.success())
    })?;
    wait_node_ready(cp, &node)?;
    Ok(())
}

#[test]
fn a_deployment_runs_scales_rolls_and_deletes_and_other_pods_stay_off() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let node = WasmletNode::start(cp, "wasm-node-deploy", &[(&web(), "web:1"), (&web(), "web:2")], FAST)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("deploy")?;
    cp.apply(&ns, &deployment("web", &node.name, "web:1", 3))?;
    wait_ready_replicas(cp, &ns, "web", 3, &node)?;
    let table = cp.kubectl_ok(&["get", "pods", "-n", &ns])?;
    assert_eq!(table.matches("1/1     Running").count(), 3, "{table}");
    for p in pods(cp, &ns, "app=web")? {
        assert_eq!(p["spec"]["nodeName"], node.name.as_str());
        assert_eq!(p["status"]["hostIP"], "127.0.0.1");
        assert!(p["status"]["podIP"].is_string(), "{}", p["status"]);
        assert!(p["status"]["containerStatuses"][0]["containerID"].as_str().unwrap().starts_with("wasmlet://"));
    }

    cp.kubectl_ok(&["scale", "-n", &ns, "deployment/web", "--replicas=10"])?;
    wait_ready_replicas(cp, &ns, "web", 10, &node)?;
    cp.kubectl_ok(&["scale", "-n", &ns, "deployment/web", "--replicas=1"])?;
    wait_ready_replicas(cp, &ns, "web", 1, &node)?;

    // A rolling update to a new tag completes.
    cp.kubectl_ok(&["set", "image", "-n", &ns, "deployment/web", "web=web:2"])?;
    cp.kubectl_ok(&["rollout", "status", "-n", &ns, "deployment/web", "--timeout=90s"])?;
    wait_ready_replicas(cp, &ns, "web", 1, &node)?;
    let p = &pods(cp, &ns, "app=web")?[0];
    assert_eq!(p["spec"]["containers"][0]["image"], "web:2");

    // kubectl delete runs preStop, and the pod is gone long before its 600 s grace period:
    // the handler drains instead of waiting it out.
    let name = p["metadata"]["name"].as_str().unwrap().to_string();
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, &name, "--timeout=120s"])?;
    assert!(node.log().contains("served /pre-stop") || web_log_has(&node, &name, "served /pre-stop"), "preStop ran");
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns])?;
    for reason in ["Scheduled", "Pulled", "Created", "Started", "Killing"] {
        assert!(events.contains(reason), "event {reason} from the scheduler or wasmlet:\n{events}");
    }

    // A pod without the RuntimeClass is not scheduled here (the taint keeps it off).
    cp.apply(
        &ns,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: plain}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {}}}\n  containers: [{{name: c, image: web:1}}]\n",
            node.name
        ),
    )?;
    cp.wait("the plain pod unschedulable", Duration::from_secs(30), || {
        let p = cp.get_json(&["get", "pod", "-n", &ns, "plain"])?;
        Ok(p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "PodScheduled" && c["status"] == "False" && c["reason"] == "Unschedulable"))
    })?;
    assert!(cp.get_json(&["get", "pod", "-n", &ns, "plain"])?["spec"]["nodeName"].is_null());
    Ok(())
}

/// Whether the CRI log of a pod's container `web` has a line with `needle`.
fn web_log_has(node: &WasmletNode, pod: &str, needle: &str) -> bool {
    let base = node.root().join("kubelet/logs");
    std::fs::read_dir(base).into_iter().flatten().flatten().any(|d| {
        d.file_name().to_string_lossy().contains(&format!("_{pod}_"))
            && std::fs::read_dir(d.path().join("web"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| std::fs::read_to_string(f.path()).unwrap_or_default().contains(needle))
    })
}

fn job(name: &str, node: &str, args: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  backoffLimit: 0
  template:
    spec:
      runtimeClassName: wasmlet
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      restartPolicy: Never
      containers:
      - name: task
        image: tool:1
        imagePullPolicy: IfNotPresent
        args: {args}
"#
    )
}

fn job_condition(cp: &ControlPlane, ns: &str, name: &str, kind: &str) -> Result<bool> {
    let j = cp.get_json(&["get", "job", "-n", ns, name])?;
    Ok(j["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == kind && c["status"] == "True"))
}

#[test]
fn jobs_succeed_and_fail_with_their_exit_codes() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let node = WasmletNode::start(cp, "wasm-node-jobs", &[(tool_module(), "tool:1")], FAST)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("jobs")?;
    cp.apply(&ns, &job("ok", &node.name, "[echo, done]"))?;
    cp.apply(&ns, &job("bad", &node.name, "[exit, \"3\"]"))?;
    cp.wait("job ok Complete", Duration::from_secs(60), || job_condition(cp, &ns, "ok", "Complete"))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    cp.wait("job bad Failed", Duration::from_secs(60), || job_condition(cp, &ns, "bad", "Failed"))?;
    let ok = &pods(cp, &ns, "job-name=ok")?[0];
    assert_eq!(ok["status"]["phase"], "Succeeded");
    assert_eq!(ok["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
    let bad = &pods(cp, &ns, "job-name=bad")?[0];
    assert_eq!(bad["status"]["phase"], "Failed");
    let t = &bad["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!((t["exitCode"].as_i64(), t["reason"].as_str()), (Some(3), Some("Error")), "{t}");
    Ok(())
}

#[test]
fn pods_read_config_maps_secrets_and_service_account_tokens_from_the_api() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let node = WasmletNode::start(cp, "wasm-node-objects", &[(tool_module(), "tool:1")], FAST)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("objects")?;
    // A Service of the namespace: its variables reach the pod's environment.
    cp.apply(
        &ns,
        "apiVersion: v1\nkind: Service\nmetadata: {name: back-end}\nspec:\n  ports: [{name: http, port: 80}]\n",
    )?;
    // (The node learns of it through its watch of Services.)
    std::thread::sleep(Duration::from_secs(2));
    cp.apply(
        &ns,
        &format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reader}}
spec:
  runtimeClassName: wasmlet
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: app
    image: tool:1
    args: [env]
    env:
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}
    volumeMounts:
    - {{name: settings, mountPath: /settings}}
  volumes:
  - name: settings
    configMap: {{name: settings}}
"#,
            node = node.name
        ),
    )?;
    cp.wait("the reader pod Running", Duration::from_secs(60), || {
        let p = cp.get_json(&["get", "pod", "-n", &ns, "reader"])?;
        Ok(p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1) || p["status"]["phase"] == "Running")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    let pod = cp.get_json(&["get", "pod", "-n", &ns, "reader"])?;
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let pod_dir = node.root().join("kubelet/pods").join(&uid);

    // The Secret reached the environment.
    let logs = node.root().join(format!("kubelet/logs/{ns}_reader_{uid}/app"));
    let env_log = || -> String {
        std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .collect()
    };
    cp.wait("PASSWORD in the container's env", Duration::from_secs(30), || Ok(env_log().contains("PASSWORD=s3cret")))?;
    let env = env_log();
    for var in [
        "BACK_END_SERVICE_PORT=80",
        "BACK_END_SERVICE_PORT_HTTP=80",
        "BACK_END_PORT=tcp://",
        "KUBERNETES_SERVICE_HOST=10.96.0.1",
    ] {
        assert!(env.contains(var), "{var} in the env:\n{env}");
    }

    // A ConfigMap edit reaches the mounted file, without a restart of the pod.
    let file = pod_dir.join("volumes/kubernetes.io~configmap/settings/greeting");
    assert_eq!(std::fs::read_to_string(&file)?, "hello");
    cp.kubectl_ok(&["patch", "configmap", "-n", &ns, "settings", "-p", r#"{"data":{"greeting":"bonjour"}}"#])?;
    cp.wait("the edited ConfigMap in the volume", Duration::from_secs(40), || {
        Ok(std::fs::read_to_string(&file).unwrap_or_default() == "bonjour")
    })?;
    let after = cp.get_json(&["get", "pod", "-n", &ns, "reader"])?;
    assert_eq!(after["metadata"]["uid"], pod["metadata"]["uid"], "the same pod");

    // The projected service account token (kube-api-access-*) is one the API server accepts.
    let projected = pod_dir.join("volumes/kubernetes.io~projected");
    let dir = std::fs::read_dir(&projected)?.flatten().next().expect("the kube-api-access volume").path();
    let token = std::fs::read_to_string(dir.join("token"))?;
    assert_eq!(std::fs::read_to_string(dir.join("namespace"))?, ns);
    assert!(std::fs::read_to_string(dir.join("ca.crt"))?.contains("BEGIN CERTIFICATE"));
    let review =
        serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let file = node.dir.path().join("review.json");
    std::fs::write(&file, review.to_string())?;
    let answer: Value =
        serde_json::from_str(&cp.kubectl_ok(&["create", "-f", &file.display().to_string(), "-o", "json"])?)?;
    assert_eq!(answer["status"]["authenticated"], true, "{answer}");
    assert_eq!(answer["status"]["user"]["username"], format!("system:serviceaccount:{ns}:default"));
    assert!(answer["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"].to_string().contains("reader"));
    Ok(())
}

/// A pod bound straight to the node (no scheduler, as a DaemonSet's or a user's nodeName),
/// so that the kubelet's own admission decides.
fn bound_pod(name: &str, node: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  tolerations: [{{operator: Exists}}]\n{extra_spec}  containers: [{{name: c, image: tool:1, args: [sleep, \"600\"]}}]\n"
    )
}

fn wait_rejected(cp: &ControlPlane, ns: &str, pod: &str, node: &WasmletNode) -> Result<Value> {
    wait_phase_within(cp, ns, pod, "Failed", node, Duration::from_secs(60))
}

#[test]
fn admission_refuses_with_the_kubelets_reasons() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let config = format!("{FAST}maxPods = 2\n");
    let node = WasmletNode::start(cp, "wasm-node-admit", &[(tool_module(), "tool:1")], &config)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("admit")?;
    let runc = "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: runc-admit}\nhandler: runc\n";
    cp.apply(&ns, runc)?;
    let cases = [
        ("affinity", "  nodeSelector: {zone: nowhere}\n", "NodeAffinity", "didn't match Pod's node affinity/selector"),
        ("handler", "  runtimeClassName: runc-admit\n", "RuntimeHandlerNotSupported", "\"runc\""),
        ("hostpid", "  hostPID: true\n", "Forbidden", "specified host PID, but is disallowed"),
    ];
    for (name, spec, _, _) in &cases {
        cp.apply(&ns, &bound_pod(name, &node.name, spec))?;
    }
    for (name, _, reason, says) in &cases {
        let s = wait_rejected(cp, &ns, name, &node)?;
        assert_eq!(s["reason"], *reason, "{name}: {s}");
        let message = s["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("Pod was rejected: ") && message.contains(says), "{name}: {message}");
    }
    // maxPods = 2: two pods run, the third is refused.
    for name in ["one", "two"] {
        cp.apply(&ns, &bound_pod(name, &node.name, ""))?;
        cp.wait(&format!("{name} Running"), Duration::from_secs(60), || {
            Ok(cp.get_json(&["get", "pod", "-n", &ns, name])?["status"]["phase"] == "Running")
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    }
    cp.apply(&ns, &bound_pod("three", &node.name, ""))?;
    let s = wait_rejected(cp, &ns, "three", &node)?;
    assert_eq!(s["reason"], "OutOfpods");
    assert_eq!(
        s["message"],
        "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2"
    );
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns])?;
    assert!(events.contains("OutOfpods") && events.contains("NodeAffinity"), "{events}");
    // A refused pod is deleted for good when asked (nothing of it runs).
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, "hostpid", "--timeout=30s"])?;
    Ok(())
}

#[test]
fn bad_kubeconfigs_and_credentials_and_a_late_api_server() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let run = |kubeconfig: &std::path::Path| {
        std::process::Command::new(wasmlet_tests::wasmlet_bin())
            .args(["node", "--hostname-override", "bad-config", "--root"])
            .arg(dir.path().join("root"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .output()
    };
    // Unreadable, and not a kubeconfig: a clear error naming the file, exit 1.
    let missing = dir.path().join("missing.kubeconfig");
    let out = run(&missing)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("kubeconfig {}", missing.display())), "{err}");
    let garbage = dir.path().join("garbage.kubeconfig");
    std::fs::write(&garbage, "clusters: [this is not: a kubeconfig")?;
    let out = run(&garbage)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("garbage.kubeconfig"), "{err}");

    // Credentials the API server does not know: retried, and said once, not at every retry.
    let mut stranger = WasmletNode::prepare(cp, "wasm-node-stranger", &[], FAST)?;
    let cert_dir = tempfile::tempdir()?;
    wasmlet_tests::cluster::self_signed(
        cert_dir.path(),
        "/O=system:nodes/CN=system:node:wasm-node-stranger",
        1,
        "k.pem",
        "c.pem",
    )?;
    let text = std::fs::read_to_string(&stranger.kubeconfig)?;
    let node_cert = cp.dir.join("node-wasm-node-stranger.crt").display().to_string();
    let node_key = cp.dir.join("node-wasm-node-stranger.key").display().to_string();
    let text = text
        .replace(&node_cert, &cert_dir.path().join("c.pem").display().to_string())
        .replace(&node_key, &cert_dir.path().join("k.pem").display().to_string());
    std::fs::write(&stranger.kubeconfig, text)?;
    stranger.spawn()?;
    cp.wait("the refusal logged", Duration::from_secs(30), || Ok(stranger.log().contains("register the node")))?;
    std::thread::sleep(Duration::from_secs(3));
    let log = stranger.log();
    assert_eq!(log.matches("register the node:").count(), 1, "logged once per change:\n{log}");
    assert!(log.contains("Unauthorized") || log.contains("401"), "{log}");
    assert!(cp.kubectl(&["get", "node", "wasm-node-stranger"])?.status.code() != Some(0));
    stranger.stop();

    // An API server that is not there at start: retried until it is.
    let mut late = WasmletNode::prepare(cp, "wasm-node-late", &[], FAST)?;
    let port = wasmlet_tests::free_port();
    late.dial_through(cp, port)?;
    late.spawn()?;
    cp.wait("the failure logged", Duration::from_secs(30), || Ok(late.log().contains("register the node")))?;
    let _proxy = Proxy::start(port, cp.port)?;
    wait_node_ready(cp, &late)?;
    Ok(())
}

#[test]
fn kill_9_and_a_restart_keep_every_pod_once() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let mut node = WasmletNode::start(cp, "wasm-node-restart", &[(&web(), "web:1")], FAST)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("restart")?;
    cp.apply(&ns, &deployment("web", &node.name, "web:1", 20))?;
    wait_ready_replicas(cp, &ns, "web", 20, &node)?;
    let uids = |cp: &ControlPlane| -> Result<Vec<String>> {
        let mut u: Vec<String> =
            pods(cp, &ns, "app=web")?.iter().map(|p| p["metadata"]["uid"].as_str().unwrap().to_string()).collect();
        u.sort();
        Ok(u)
    };
    let before = uids(cp)?;
    // And one pod that is force-deleted while the node is down.
    cp.apply(
        &ns,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: gone}}\nspec:\n  runtimeClassName: wasmlet\n  nodeSelector: {{kubernetes.io/hostname: {}}}\n  containers: [{{name: web, image: web:1}}]\n",
            node.name
        ),
    )?;
    cp.wait("gone Running", Duration::from_secs(60), || {
        Ok(cp.get_json(&["get", "pod", "-n", &ns, "gone"])?["status"]["phase"] == "Running")
    })?;
    assert_eq!(node.sandboxes()?.len(), 21);

    node.kill9();
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, "gone", "--grace-period=0", "--force"])?;
    node.spawn()?;
    // The same 20 pods come back Ready; each container died with the process and was started
    // again, once.
    cp.wait("the 20 pods restarted once and ready", Duration::from_secs(120), || {
        let all = pods(cp, &ns, "app=web")?;
        Ok(all.len() == 20
            && all.iter().all(|p| ready(p) && p["status"]["containerStatuses"][0]["restartCount"].as_i64() == Some(1)))
    })
    .map_err(|e| {
        anyhow::anyhow!("{e}\n{}\n{}", cp.kubectl_ok(&["get", "pods", "-n", &ns]).unwrap_or_default(), node.log())
    })?;
    assert_eq!(uids(cp)?, before, "no pod lost or replaced");
    // No duplicate sandboxes, and the one of the pod deleted meanwhile is removed.
    cp.wait("20 sandboxes", Duration::from_secs(40), || Ok(node.sandboxes()?.len() == 20))
        .map_err(|e| anyhow::anyhow!("{e}: {:?}\n{}", node.sandboxes().map(|s| s.len()), node.log()))?;
    for p in pods(cp, &ns, "app=web")? {
        let last = &p["status"]["containerStatuses"][0]["lastState"]["terminated"];
        assert_eq!(last["exitCode"], 255, "the instance that died with wasmlet: {last}");
    }
    Ok(())
}

#[test]
fn tls_bootstrapping_from_a_token_to_node_credentials() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    // What a cluster admin sets up for joining nodes (as kubeadm does): a bootstrap token,
    // the right to create CSRs, and auto-approval of node client certificates.
    cp.apply(
        "kube-system",
        r#"apiVersion: v1
kind: Secret
metadata: {name: bootstrap-token-wasm01, namespace: kube-system}
type: bootstrap.kubernetes.io/token
stringData:
  token-id: wasm01
  token-secret: 0123456789abcdef
  usage-bootstrap-authentication: "true"
  auth-extra-groups: system:bootstrappers:wasmlet
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: wasmlet-bootstrappers-create-csrs}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node-bootstrapper"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:wasmlet"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: wasmlet-bootstrappers-auto-approve}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:nodeclient"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:wasmlet"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: wasmlet-nodes-auto-approve-renewals}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
"#,
    )?;
    let mut node = WasmletNode::prepare(cp, "wasm-node-boot", &[], FAST)?;
    let bootstrap = node.dir.path().join("bootstrap.kubeconfig");
    std::fs::write(
        &bootstrap,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"https://127.0.0.1:{}\", certificate-authority: {}}}\nusers:\n- name: b\n  user: {{token: wasm01.0123456789abcdef}}\ncontexts:\n- name: b\n  context: {{cluster: c, user: b}}\ncurrent-context: b\n",
            cp.port,
            cp.ca().display()
        ),
    )?;
    // No node credentials yet: only the bootstrap token.
    node.kubeconfig = node.dir.path().join("kubelet.kubeconfig");
    node.extra = vec!["--bootstrap-kubeconfig".into(), bootstrap.display().to_string()];
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    let pem = node.root().join("pki").join("kubelet-client-current.pem");
    let end = |path: &std::path::Path| -> Result<String> {
        let dir = path.parent().unwrap_or(path);
        let pem = path.display().to_string();
        Ok(wasmlet_tests::cluster::openssl(dir, &["x509", "-noout", "-enddate", "-in", &pem])?.trim().to_string())
    };
    let first_end = end(&pem)?;
    assert!(first_end.starts_with("notAfter="), "{first_end} ({})", pem.display());
    let issued = std::time::Instant::now();
    let csrs = cp.get_json(&["get", "csr"])?;
    let ours: Vec<&Value> = csrs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["spec"]["username"] == "system:bootstrap:wasm01")
        .collect();
    assert_eq!(ours.len(), 1, "{csrs}");
    assert_eq!(ours[0]["spec"]["signerName"], "kubernetes.io/kube-apiserver-client-kubelet");
    let conditions = ours[0]["status"]["conditions"].to_string();
    assert!(conditions.contains("Approved"), "{conditions}");
    let written = std::fs::read_to_string(&node.kubeconfig)?;
    assert!(written.contains("client-certificate") && !written.contains("wasm01."), "{written}");
    // From then on the node works with its node credentials alone: started again without
    // the bootstrap kubeconfig, it renews its Lease as system:node:wasm-node-boot.
    node.kill9();
    std::fs::remove_file(&bootstrap)?;
    node.extra.clear();
    node.spawn()?;
    let lease = cp.get_json(&["get", "lease", "-n", "kube-node-lease", "wasm-node-boot"])?;
    let t0 = lease["spec"]["renewTime"].as_str().unwrap_or_default().to_string();
    let renewed_after = |t0: &str| -> Result<bool> {
        let l = cp.get_json(&["get", "lease", "-n", "kube-node-lease", "wasm-node-boot"])?;
        Ok(l["spec"]["renewTime"].as_str().is_some_and(|t| t > t0))
    };
    cp.wait("the Lease renewed with node credentials", Duration::from_secs(30), || renewed_after(&t0))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    // Rotation: before the first certificate expires the node asks for a new one with its
    // own credentials (auto-approved for system:nodes), and keeps working past the old one's
    // end, which the API server would refuse.
    let renewal = |c: &Value| {
        c["spec"]["username"] == "system:node:wasm-node-boot"
            && c["status"]["certificate"].as_str().is_some_and(|s| !s.is_empty())
    };
    cp.wait("a renewal CSR from the node itself, issued", Duration::from_secs(240), || {
        Ok(cp.get_json(&["get", "csr"])?["items"].as_array().is_some_and(|a| a.iter().any(renewal)))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    cp.wait("the rotated certificate on disk", Duration::from_secs(30), || Ok(end(&pem)? != first_end))?;
    // Past the first certificate's end (it was issued at most a few seconds before `issued`).
    std::thread::sleep(SIGNING_DURATION.saturating_sub(issued.elapsed()) + Duration::from_secs(5));
    let now = cp.get_json(&["get", "lease", "-n", "kube-node-lease", "wasm-node-boot"])?;
    let t1 = now["spec"]["renewTime"].as_str().unwrap_or_default().to_string();
    cp.wait("the Lease renewed after the first certificate expired", Duration::from_secs(30), || renewed_after(&t1))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    assert!(node.log().contains("client certificate rotated"), "{}", node.log());
    Ok(())
}

#[test]
fn static_pods_get_mirror_pods() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let ns = cp.namespace("mirror")?;
    let mut node = WasmletNode::prepare(cp, "wasm-node-static", &[(tool_module(), "tool:1")], FAST)?;
    let manifests = node.dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let file = manifests.join("ticker.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: ticker, namespace: {ns}}}\nspec:\n  containers: [{{name: c, image: tool:1, args: [sleep, \"600\"]}}]\n"
        ),
    )?;
    node.extra = vec!["--pod-manifest-path".into(), manifests.display().to_string()];
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    let name = "ticker-wasm-node-static";
    let mut mirror = Value::Null;
    cp.wait("the mirror pod Running", Duration::from_secs(60), || {
        let Some(m) = cp.get_opt_json(&["get", "pod", "-n", &ns, name])? else { return Ok(false) };
        mirror = m;
        Ok(mirror["status"]["phase"] == "Running")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{mirror}\n{}", node.log()))?;
    let notes = &mirror["metadata"]["annotations"];
    assert!(notes["kubernetes.io/config.mirror"].is_string(), "{notes}");
    assert_eq!(notes["kubernetes.io/config.source"], "file");
    let owner = &mirror["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("Node"), Some("wasm-node-static")));
    assert_eq!(mirror["spec"]["nodeName"], "wasm-node-static");
    // A mirror deleted by a user is made again (the static pod keeps running).
    let first = mirror["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, name, "--wait=false"])?;
    cp.wait("the mirror pod made again", Duration::from_secs(60), || {
        let Some(m) = cp.get_opt_json(&["get", "pod", "-n", &ns, name])? else { return Ok(false) };
        Ok(m["metadata"]["uid"].as_str().is_some_and(|u| u != first) && m["status"]["phase"] == "Running")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    // The static pod removed, its mirror goes too.
    std::fs::remove_file(&file)?;
    cp.wait("the mirror pod deleted", Duration::from_secs(60), || {
        Ok(!cp.kubectl(&["get", "pod", "-n", &ns, name])?.status.success())
    })?;
    Ok(())
}

#[test]
fn an_api_server_outage_of_a_minute_keeps_pods_running_and_status_catches_up() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let ns = cp.namespace("outage")?;
    let mut node = WasmletNode::prepare(cp, "wasm-node-outage", &[(&web(), "web:1"), (tool_module(), "tool:1")], FAST)?;
    let port = wasmlet_tests::free_port();
    node.dial_through(cp, port)?;
    let mut proxy = Proxy::start(port, cp.port)?;
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    cp.apply(&ns, &deployment("web", &node.name, "web:1", 3))?;
    let bound = |name: &str, args: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: wasmlet\n  nodeSelector: {{kubernetes.io/hostname: {}}}\n  restartPolicy: {policy}\n  containers: [{{name: c, image: tool:1, args: {args}}}]\n",
            node.name
        )
    };
    cp.apply(&ns, &bound("doomed", "[sleep, \"600\"]", "Always"))?;
    // Ends by itself during the outage: its status must reach the API afterwards.
    cp.apply(&ns, &bound("finisher", "[sleep, \"20\"]", "Never"))?;
    wait_ready_replicas(cp, &ns, "web", 3, &node)?;
    cp.wait("doomed and finisher Running", Duration::from_secs(60), || {
        let a = cp.get_json(&["get", "pod", "-n", &ns, "doomed"])?;
        let b = cp.get_json(&["get", "pod", "-n", &ns, "finisher"])?;
        Ok(a["status"]["phase"] == "Running" && b["status"]["phase"] == "Running")
    })?;
    let uids = |cp: &ControlPlane| -> Result<Vec<String>> {
        let mut u: Vec<String> = pods(cp, &ns, "app=web")?.iter().map(|p| p["metadata"]["uid"].to_string()).collect();
        u.sort();
        Ok(u)
    };
    let before = uids(cp)?;

    // A minute cut off from the API server.
    proxy.stop();
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, "doomed", "--wait=false"])?;
    std::thread::sleep(Duration::from_secs(60));
    // The pods kept running meanwhile (the finisher ended by itself).
    let ready_sandboxes = node.sandboxes()?.iter().filter(|s| s.state == 0).count();
    assert_eq!(ready_sandboxes, 4, "3 web pods and doomed still running, finisher done");

    let _proxy = Proxy::start(port, cp.port)?;
    wait_node_ready(cp, &node)?;
    // The deletion made meanwhile is carried out, and the status caught up.
    cp.wait("doomed stopped and gone", Duration::from_secs(60), || {
        Ok(!cp.kubectl(&["get", "pod", "-n", &ns, "doomed"])?.status.success())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    cp.wait("finisher Succeeded in the API", Duration::from_secs(60), || {
        Ok(cp.get_json(&["get", "pod", "-n", &ns, "finisher"])?["status"]["phase"] == "Succeeded")
    })?;
    assert_eq!(uids(cp)?, before, "the web pods are the same pods");
    // The node-lifecycle controller marked them not Ready while the node was unreachable;
    // the node sets their status right again.
    cp.wait("the web pods Ready again", Duration::from_secs(40), || Ok(pods(cp, &ns, "app=web")?.iter().all(ready)))?;
    for p in pods(cp, &ns, "app=web")? {
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0, "kept running through the outage");
    }
    cp.wait("doomed's sandbox removed", Duration::from_secs(30), || {
        Ok(node.sandboxes()?.iter().filter(|s| s.state == 0).count() == 3)
    })?;
    Ok(())
}

#[test]
fn a_stateful_set_keeps_its_data_on_local_persistent_volumes() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let ns = cp.namespace("stateful")?;
    let node = WasmletNode::start(cp, "wasm-node-state", &[(tool_module(), "tool:1")], FAST)?;
    wait_node_ready(cp, &node)?;
    let disks = node.dir.path().join("disks");
    let mut manifest = String::from(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: wasm-local}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: WaitForFirstConsumer\n",
    );
    for i in 0..2 {
        let dir = disks.join(format!("pv{i}"));
        std::fs::create_dir_all(&dir)?;
        manifest += &format!(
            "---\napiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: wasm-state-pv{i}}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: wasm-local\n  local: {{path: {}}}\n  nodeAffinity:\n    required:\n      nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{}]}}]}}]\n",
            dir.display(),
            node.name
        );
    }
    cp.apply(&ns, &manifest)?;
    cp.apply(
        &ns,
        &format!(
            r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db}}
spec:
  serviceName: db
  replicas: 2
  # The container writes and ends (then is restarted): never Ready, so not OrderedReady.
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:
      runtimeClassName: wasmlet
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: db
        image: tool:1
        args: [write, "/data/$(POD_NAME)-$(POD_UID)", "written"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: POD_UID
          valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}
        volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec:
      accessModes: [ReadWriteOnce]
      storageClassName: wasm-local
      resources: {{requests: {{storage: 1Gi}}}}
"#,
            node = node.name
        ),
    )?;
    // Each pod writes a file named after itself into its volume.
    let files = || -> Vec<String> {
        let mut all: Vec<String> = (0..2)
            .flat_map(|i| std::fs::read_dir(disks.join(format!("pv{i}"))).into_iter().flatten().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        all.sort();
        all
    };
    cp.wait("both pods wrote to their volumes", Duration::from_secs(90), || Ok(files().len() == 2)).map_err(|e| {
        anyhow::anyhow!("{e}\n{}\n{}", cp.kubectl_ok(&["get", "pods,pvc", "-n", &ns]).unwrap_or_default(), node.log())
    })?;
    let first = cp.get_json(&["get", "pod", "-n", &ns, "db-0"])?["metadata"]["uid"].as_str().unwrap().to_string();
    let dir_of_db0 = (0..2)
        .map(|i| disks.join(format!("pv{i}")))
        .find(|d| {
            std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("db-0-"))
        })
        .expect("db-0's volume");
    // db-0 deleted: the StatefulSet makes a new db-0 on the same claim, which finds the data.
    cp.kubectl_ok(&["delete", "pod", "-n", &ns, "db-0", "--timeout=60s"])?;
    cp.wait("the new db-0 wrote beside the old one's file", Duration::from_secs(90), || {
        let names: Vec<String> =
            std::fs::read_dir(&dir_of_db0)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        Ok(names.len() == 2 && names.iter().any(|n| *n == format!("db-0-{first}")))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{:?}\n{}", files(), node.log()))?;
    Ok(())
}

#[test]
fn a_pod_whose_image_is_not_wasm_ends_in_err_image_pull() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let rt = tokio::runtime::Runtime::new()?;
    let registry = rt.block_on(wasmlet_tests::RegistryServer::start())?;
    let image = format!("{}/plain/shell:1", registry.host);
    rt.block_on(wasmlet_tests::images::push_image(
        &image,
        &[(wasmlet_tests::images::tar_layer(&[("bin/sh", b"#!")]), false)],
        serde_json::json!({"Entrypoint": ["/bin/sh"]}),
    ));
    let node = WasmletNode::start(cp, "wasm-node-image", &[], FAST)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("image")?;
    cp.apply(
        &ns,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: shell}}\nspec:\n  runtimeClassName: wasmlet\n  nodeSelector: {{kubernetes.io/hostname: {}}}\n  containers: [{{name: c, image: \"{image}\"}}]\n",
            node.name
        ),
    )?;
    let mut waiting = Value::Null;
    cp.wait("ErrImagePull or ImagePullBackOff", Duration::from_secs(60), || {
        let p = cp.get_json(&["get", "pod", "-n", &ns, "shell"])?;
        waiting = p["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        Ok(matches!(waiting["reason"].as_str(), Some("ErrImagePull") | Some("ImagePullBackOff")))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{waiting}\n{}", node.log()))?;
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns])?;
    assert!(
        events.contains("Failed to pull image") && events.contains(&image) && events.contains("not a wasm image"),
        "{events}"
    );
    Ok(())
}

/// `kubectl ARGS` as the admin with `input` on its stdin.
fn kubectl_with_input(cp: &ControlPlane, args: &[&str], input: &[u8]) -> Result<std::process::Output> {
    let mut c = std::process::Command::new(cp.bin.join("kubectl"));
    c.arg("--kubeconfig").arg(&cp.admin).args(args);
    Ok(wasmlet_tests::output_with_input(&mut c, input)?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `curl` to the node API directly, with a bearer token or none; the HTTP status.
fn node_api_status(node: &WasmletNode, path: &str, token: Option<&str>) -> Result<String> {
    let mut c = std::process::Command::new("curl");
    c.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(format!("https://{}:{}{path}", node.ip, node.port)).output()?;
    Ok(text(&out.stdout))
}

#[test]
fn kubectl_logs_exec_attach_and_port_forward_reach_the_node_api() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    // The API server's node proxy (get --raw .../proxy/...) refuses loopback addresses.
    wasmlet_tests::cluster::local_address(wasmlet_tests::cluster::NODE_API_IP)?;
    let web = web();
    let images = [(tool_module(), "tool:1"), (web.as_path(), "web:1"), (wasmlet_tests::box_module(), "box:1")];
    let mut node = WasmletNode::prepare(cp, "wasm-node-api", &images, FAST)?;
    node.ip = wasmlet_tests::cluster::NODE_API_IP.into();
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("api")?;
    let pod = |name: &str, image: &str, args: &str, restart: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {n}\n  restartPolicy: {restart}\n  tolerations: [{{operator: Exists}}]\n  containers: [{{name: c, image: {image}, args: {args}}}]\n",
            n = node.name
        )
    };
    cp.apply(&ns, &pod("sleeper", "tool:1", "[sleep, \"600\"]", "Always"))?;
    cp.apply(&ns, &pod("short", "tool:1", "[sleep, \"3\"]", "Never"))?;
    cp.apply(&ns, &pod("crasher", "tool:1", "[exit, \"1\"]", "Always"))?;
    let web_pod = pod("web", "web:1", "[]", "Always")
        .replace("args: []", "args: [], readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}");
    cp.apply(&ns, &web_pod)?;
    // The conformance userland's shell, waiting on its stdin.
    let shell = pod("shell", "box:1", "[sh]", "Always").replace("args: [sh]", "args: [sh], stdin: true");
    cp.apply(&ns, &shell)?;
    let typist = pod("typist", "tool:1", "[stdin]", "Never")
        .replace("args: [stdin]", "args: [stdin], stdin: true, stdinOnce: true");
    cp.apply(&ns, &typist)?;
    cp.wait("pods running", Duration::from_secs(60), || {
        let all = pods(cp, &ns, "")?;
        let running = |n: &str| all.iter().any(|p| p["metadata"]["name"] == n && p["status"]["phase"] == "Running");
        Ok(running("sleeper") && running("web") && running("typist") && running("shell"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;

    // kubectl logs and its options.
    let logs = |args: &[&str]| -> Result<String> {
        let mut all = vec!["logs", "-n", &ns];
        all.extend_from_slice(args);
        cp.kubectl_ok(&all)
    };
    assert_eq!(logs(&["sleeper"])?, "sleeping 600 s\n");
    let stamped = logs(&["sleeper", "--timestamps"])?;
    assert!(stamped.starts_with("20") && stamped.ends_with(" sleeping 600 s\n"), "{stamped}");
    assert_eq!(logs(&["sleeper", "--tail=1"])?, "sleeping 600 s\n");
    assert_eq!(logs(&["sleeper", "--tail=0"])?, "");
    assert_eq!(logs(&["sleeper", "--limit-bytes=5"])?, "sleep");
    assert_eq!(logs(&["sleeper", "--since=1h"])?, "sleeping 600 s\n");
    // -f follows the log until the container ends.
    let followed = logs(&["short", "-f"])?;
    assert_eq!(followed, "sleeping 3 s\nslept\n");
    // --previous: the log of the container before the restart.
    cp.wait("crasher restarted", Duration::from_secs(60), || {
        let p = cp.get_json(&["get", "pod", "-n", &ns, "crasher"])?;
        Ok(p["status"]["containerStatuses"][0]["restartCount"].as_i64().unwrap_or(0) >= 1)
    })?;
    assert_eq!(logs(&["crasher", "--previous"])?, "exiting with 1\n");
    let e = cp.kubectl(&["logs", "-n", &ns, "sleeper", "--previous"])?;
    assert!(!e.status.success() && text(&e.stderr).contains("previous terminated container"), "{e:?}");

    // kubectl exec: stdout and stderr apart, the exit code as kubectl reports it, stdin.
    let out = cp.kubectl(&["exec", "-n", &ns, "sleeper", "--", "tool", "stderr", "oops"])?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!((text(&out.stdout).as_str(), text(&out.stderr).as_str()), ("to stdout\n", "oops\n"));
    let out = cp.kubectl(&["exec", "-n", &ns, "sleeper", "--", "tool", "exit", "3"])?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stderr).contains("command terminated with exit code 3"), "{out:?}");
    let out = kubectl_with_input(cp, &["exec", "-i", "-n", &ns, "sleeper", "--", "tool", "stdin"], b"typed in")?;
    assert_eq!(text(&out.stdout), "typed in", "{out:?}");
    let out = cp.kubectl(&["exec", "-n", &ns, "sleeper", "--", "/no/such"])?;
    assert!(!out.status.success() && text(&out.stderr).contains("no such file or directory"), "{out:?}");

    // kubectl exec -it into the shell: a terminal of the size kubectl's is (COLUMNS), what is
    // typed echoed, lines ended with CR LF, the exit code. script(1) gives kubectl a terminal;
    // the typing waits until kubectl has put it in raw mode.
    let cmd = format!(
        "stty cols 123 rows 45; {} --kubeconfig {} exec -it -n {ns} shell -- sh",
        cp.bin.join("kubectl").display(),
        cp.admin.display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut typing = child.stdin.take().expect("piped");
    let typist = std::thread::spawn(move || {
        use std::io::Write;
        std::thread::sleep(Duration::from_secs(3));
        let _ = typing.write_all(b"echo cols=$COLUMNS lines=$LINES\rexit 3\r");
        std::thread::sleep(Duration::from_secs(5));
    });
    let out = child.wait_with_output()?;
    let _ = typist.join();
    let screen = text(&out.stdout);
    assert!(screen.contains("echo cols=$COLUMNS lines=$LINES\r\n"), "the typing is echoed: {screen:?}");
    assert!(screen.contains("cols=123 lines=45\r\n"), "{screen:?}");
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // kubectl attach: what it types reaches the container's stdin (stdinOnce: its end closes
    // it, and `tool stdin` ends), the container's output comes back.
    let out = kubectl_with_input(cp, &["attach", "-i", "-n", &ns, "typist", "-c", "c"], b"typed to attach\n")?;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("typed to attach\n"), "{out:?}");
    assert!(text(&out.stderr).contains("read 16 bytes"), "{out:?}");

    // kubectl port-forward carries HTTP to the wasm server.
    let local = wasmlet_tests::free_port();
    get_through(cp, kubectl_port_forward(cp, &ns, "web", local, 8080), local, "/ready")
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;

    // Resource figures through the API server's node proxy, as metrics-server reads them.
    let raw = |path: &str| cp.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{}/proxy{path}", node.name)]);
    let summary: Value = serde_json::from_str(&raw("/stats/summary")?)?;
    assert_eq!(summary["node"]["nodeName"], node.name.as_str());
    assert!(summary["node"]["cpu"]["usageCoreNanoSeconds"].as_u64().unwrap_or(0) > 0, "{summary}");
    let sleeper = summary["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["podRef"]["name"] == "sleeper" && p["podRef"]["namespace"] == ns.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no sleeper in {summary}"));
    assert_eq!(sleeper["containers"][0]["name"], "c");
    assert!(sleeper["memory"]["workingSetBytes"].as_u64().unwrap_or(0) > 0, "{sleeper}");
    let running: Value = serde_json::from_str(&raw("/runningpods/")?)?;
    assert!(running["items"].as_array().into_iter().flatten().any(|p| p["metadata"]["name"] == "sleeper"), "{running}");
    let bound: Value = serde_json::from_str(&raw("/pods")?)?;
    assert_eq!(bound["kind"], "PodList");
    assert!(bound["items"].as_array().into_iter().flatten().any(|p| p["metadata"]["name"] == "web"), "{bound}");
    let configz: Value = serde_json::from_str(&raw("/configz")?)?;
    assert_eq!(configz["kubeletconfig"]["port"], node.port);
    let metrics = raw("/metrics/resource")?;
    let line = format!("container_cpu_usage_seconds_total{{container=\"c\",namespace=\"{ns}\",pod=\"sleeper\"}} ");
    assert!(metrics.contains(&line) && metrics.contains("node_memory_working_set_bytes "), "{metrics}");
    // The kubelet's own metrics, by its names, and the prober's.
    let metrics = raw("/metrics")?;
    for needle in [
        format!("kubelet_node_name{{node=\"{}\"}} 1\n", node.name),
        "\nkubelet_running_containers{container_state=\"running\"} ".into(),
        "\nkubelet_started_pods_total ".into(),
        "\nkubelet_started_containers_total{container_type=\"container\"} ".into(),
        "\nkubelet_pod_start_duration_seconds_count ".into(),
        "\nkubelet_pod_start_sli_duration_seconds_bucket{le=\"+Inf\"} ".into(),
        "\nkubelet_runtime_operations_total{operation_type=\"run_podsandbox\"} ".into(),
        "\nkubelet_runtime_operations_duration_seconds_bucket{operation_type=\"create_container\",le=\"+Inf\"} ".into(),
        "# TYPE kubelet_running_pods gauge\nkubelet_running_pods ".into(),
    ] {
        assert!(metrics.contains(&needle), "{needle:?} not in\n{metrics}");
    }
    let probes = raw("/metrics/probes")?;
    let needle = format!(
        "prober_probe_total{{probe_type=\"Readiness\",container=\"c\",pod=\"web\",namespace=\"{ns}\",result=\"successful\""
    );
    assert!(probes.contains(&needle), "{needle} not in\n{probes}");

    // The node API itself: anonymous refused, a token without the rights refused, one with
    // nodes/proxy let in.
    assert_eq!(node_api_status(&node, "/healthz", None)?, "401");
    cp.kubectl_ok(&["create", "serviceaccount", "-n", &ns, "nobody"])?;
    cp.kubectl_ok(&["create", "serviceaccount", "-n", &ns, "prober"])?;
    let role = format!("node-proxy-{ns}");
    cp.kubectl_ok(&["create", "clusterrole", &role, "--verb=get,create", "--resource=nodes/proxy"])?;
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        &role,
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={ns}:prober"),
    ])?;
    let nobody = cp.kubectl_ok(&["create", "token", "-n", &ns, "nobody"])?;
    let prober = cp.kubectl_ok(&["create", "token", "-n", &ns, "prober"])?;
    assert_eq!(node_api_status(&node, "/healthz", Some(nobody.trim()))?, "403");
    assert_eq!(node_api_status(&node, "/healthz", Some("not-a-token"))?, "401");
    cp.wait("RBAC lets the prober in", Duration::from_secs(30), || {
        Ok(node_api_status(&node, "/healthz", Some(prober.trim()))? == "200")
    })?;
    assert_eq!(node_api_status(&node, &format!("/containerLogs/{ns}/sleeper/c"), Some(prober.trim()))?, "200");
    // nodes/proxy is not nodes/stats, nor nodes/metrics.
    assert_eq!(node_api_status(&node, "/stats/summary", Some(prober.trim()))?, "403");
    assert_eq!(node_api_status(&node, "/metrics", Some(prober.trim()))?, "403");
    // Through the API server, a user without the rights is refused each of them.
    let nodes_proxy = |p: &str| format!("/api/v1/nodes/{}/proxy{p}", node.name);
    let local = wasmlet_tests::free_port().to_string();
    for args in [
        vec!["logs", "-n", &ns, "sleeper"],
        vec!["exec", "-n", &ns, "sleeper", "--", "tool", "hello"],
        vec!["attach", "-n", &ns, "typist", "-c", "c"],
        vec!["port-forward", "-n", &ns, "pod/web", &local],
        vec!["get", "--raw", &nodes_proxy("/stats/summary")],
        vec!["get", "--raw", &nodes_proxy("/metrics")],
    ] {
        let mut all = vec!["--as", "system:serviceaccount:default:nobody"];
        all.extend_from_slice(&args);
        let no_rights = cp.kubectl(&all)?;
        assert!(
            !no_rights.status.success() && text(&no_rights.stderr).contains("forbidden"),
            "{args:?}: {no_rights:?}"
        );
    }
    Ok(())
}

/// crictl against the CRI socket at `socket`, with `input` on its stdin.
fn crictl(cp: &ControlPlane, socket: &std::path::Path, args: &[&str], input: &[u8]) -> Result<std::process::Output> {
    let mut c = std::process::Command::new(cp.bin.join("crictl"));
    c.arg("--runtime-endpoint").arg(format!("unix://{}", socket.display())).args(["--timeout", "20s"]).args(args);
    Ok(wasmlet_tests::output_with_input(&mut c, input)?)
}

/// `kubectl port-forward` of pod `pod` in `ns` from 127.0.0.1:`local` to `remote`.
fn kubectl_port_forward(cp: &ControlPlane, ns: &str, pod: &str, local: u16, remote: u16) -> std::process::Command {
    let mut c = std::process::Command::new(cp.bin.join("kubectl"));
    c.arg("--kubeconfig").arg(&cp.admin);
    c.args(["port-forward", "-n", ns, &format!("pod/{pod}"), &format!("{local}:{remote}")]);
    c
}

/// Runs a port forward (`forward`, which listens on 127.0.0.1:`local`) until an HTTP GET of
/// `path` through it answers 200, then ends it.
fn get_through(cp: &ControlPlane, mut forward: std::process::Command, local: u16, path: &str) -> Result<()> {
    let mut child = forward.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn()?;
    let got = get_200(cp, local, path);
    let _ = child.kill();
    let out = child.wait_with_output()?;
    got.map_err(|e| anyhow::anyhow!("{e}: {}", text(&out.stderr)))
}

/// An HTTP/1.0 GET of `path` on 127.0.0.1:`port`, retried until it answers 200 (a port
/// forward takes a moment to listen).
fn get_200(cp: &ControlPlane, port: u16, path: &str) -> Result<()> {
    let mut answer = String::new();
    cp.wait(&format!("200 from 127.0.0.1:{port}{path}"), Duration::from_secs(30), || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return Ok(false) };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
        answer.clear();
        let _ = s.read_to_string(&mut answer);
        Ok(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
    })
    .map_err(|e| anyhow::anyhow!("{e}: last answer {answer:?}"))
}

#[test]
fn a_stock_kubelet_streams_through_wasmlets_cri() -> Result<()> {
    use wasmlet_tests::cluster::StockKubelet;
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let tokio = tokio::runtime::Runtime::new()?;
    // No CNI at all: as root, wasmlet's own bridge (a bridge and range of this test's, as other
    // tests' wasmlets run at the same time).
    let dir = tempfile::tempdir()?;
    let net = wasmlet_tests::TestBridge::new(dir.path(), 'k');
    let server = tokio.block_on(wasmlet_tests::Server::start_with(&["--config", &net.config.display().to_string()]))?;
    server.import(tool_module(), "tool:1")?;
    server.import(&web(), "web:1")?;
    let socket = server.socket();
    let kubelet = StockKubelet::start(cp, "stock-kubelet", &socket)?;
    cp.wait("the stock kubelet's node Ready", Duration::from_secs(90), || {
        let Some(n) = cp.get_opt_json(&["get", "node", &kubelet.name])? else { return Ok(false) };
        Ok(node_condition(&n, "Ready").as_deref() == Some("True"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", kubelet.log()))?;
    let ns = cp.namespace("stock")?;
    let pod = |name: &str, image: &str, container: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {n}\n  restartPolicy: Never\n  containers: [{{name: c, image: {image}, imagePullPolicy: Never, {container}}}]\n",
            n = kubelet.name
        )
    };
    cp.apply(&ns, &pod("sleeper", "tool:1", "args: [sleep, \"600\"]"))?;
    // The kubelet's own httpGet probe dials the pod IP from the host.
    let probe = "readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}";
    cp.apply(&ns, &pod("web", "web:1", &format!("ports: [{{containerPort: 8080}}], {probe}")))?;
    for typist in ["typist", "typist-crictl"] {
        cp.apply(&ns, &pod(typist, "tool:1", "args: [stdin], stdin: true, stdinOnce: true"))?;
    }
    cp.wait("the stock kubelet's pods running, web ready", Duration::from_secs(60), || {
        let all = pods(cp, &ns, "")?;
        let web_ready = all.iter().any(|p| p["metadata"]["name"] == "web" && ready(p));
        Ok(all.len() == 4 && all.iter().all(|p| p["status"]["phase"] == "Running") && web_ready)
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", kubelet.log(), server.server_log()))?;
    // The pod IP the kubelet probed is on the test's bridge, never routed out of the host.
    let web_ip =
        cp.get_json(&["get", "pod", "-n", &ns, "web"])?["status"]["podIP"].as_str().unwrap_or_default().to_string();
    assert!(web_ip.starts_with(&net.prefix), "web's IP {web_ip} is not from {}0/24", net.prefix);
    wasmlet_tests::ensure_on_device(&web_ip, &net.name)?;

    // The kubelet's own streaming: kubectl reaches its /exec, /attach and /portForward through
    // the API server, and the kubelet proxies them to wasmlet's streaming server.
    let out = cp.kubectl(&["exec", "-n", &ns, "sleeper", "--", "tool", "stderr", "oops"])?;
    assert!(out.status.success(), "{out:?}\n{}", kubelet.log());
    assert_eq!((text(&out.stdout).as_str(), text(&out.stderr).as_str()), ("to stdout\n", "oops\n"));
    let out = cp.kubectl(&["exec", "-n", &ns, "sleeper", "--", "tool", "exit", "3"])?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = kubectl_with_input(cp, &["attach", "-i", "-n", &ns, "typist", "-c", "c"], b"typed to attach\n")?;
    assert!(text(&out.stdout).contains("typed to attach\n"), "{out:?}");
    let local = wasmlet_tests::free_port();
    get_through(cp, kubectl_port_forward(cp, &ns, "web", local, 8080), local, "/ready")?;

    // crictl on the same socket, on the kubelet's containers and sandboxes.
    let id_of = |pod: &str| -> Result<String> {
        let out = crictl(cp, &socket, &["ps", "-q", "--label", &format!("io.kubernetes.pod.name={pod}")], b"")?;
        Ok(text(&out.stdout).trim().to_string())
    };
    let sleeper = id_of("sleeper")?;
    // -it wants a terminal of crictl's own: script(1) gives it one.
    let cmd = format!(
        "{} --runtime-endpoint unix://{} exec -it {sleeper} tool isatty",
        cp.bin.join("crictl").display(),
        socket.display()
    );
    let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output()?;
    assert!(text(&out.stdout).contains("stdin=1 stdout=1 stderr=1"), "{out:?}");
    let out = crictl(cp, &socket, &["attach", "-i", &id_of("typist-crictl")?], b"typed to crictl\n")?;
    assert!(out.status.success() && text(&out.stdout) == "typed to crictl\n", "{out:?}");
    let sandbox = {
        let out = crictl(cp, &socket, &["pods", "-q", "--name", "web"], b"")?;
        text(&out.stdout).trim().to_string()
    };
    let local = wasmlet_tests::free_port();
    let mut forward = std::process::Command::new(cp.bin.join("crictl"));
    forward.arg("--runtime-endpoint").arg(format!("unix://{}", socket.display()));
    forward.args(["port-forward", &sandbox, &format!("{local}:8080")]);
    get_through(cp, forward, local, "/ready")?;
    cp.kubectl_ok(&["delete", "namespace", &ns, "--wait=false"])?;
    cp.kubectl_ok(&["delete", "node", &kubelet.name, "--wait=false"])?;
    Ok(())
}

#[test]
fn the_node_api_serves_with_a_certificate_from_the_kubelet_serving_signer() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    wasmlet_tests::cluster::local_address(wasmlet_tests::cluster::NODE_API_IP)?;
    let config = format!("{FAST}serverTLSBootstrap = true\n");
    let mut node = WasmletNode::prepare(cp, "wasm-node-serving", &[], &config)?;
    node.ip = wasmlet_tests::cluster::NODE_API_IP.into();
    node.serving_files = false;
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    // The node asks for its serving certificate, as itself, from the kubelet-serving signer.
    let user = format!("system:node:{}", node.name);
    let mut csr = String::new();
    cp.wait("the node's serving CSR", Duration::from_secs(30), || {
        let list = cp.get_json(&["get", "csr"])?;
        let found = list["items"].as_array().into_iter().flatten().find(|c| {
            c["spec"]["signerName"] == "kubernetes.io/kubelet-serving" && c["spec"]["username"] == user.as_str()
        });
        csr = found.and_then(|c| c["metadata"]["name"].as_str()).unwrap_or_default().to_string();
        Ok(!csr.is_empty())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    // Until it is approved there is nothing to serve with: TLS handshakes fail.
    let url = format!("https://{}:{}/healthz", node.ip, node.port);
    let curl = |ca: bool| -> Result<String> {
        let mut c = std::process::Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]);
        if ca {
            c.arg("--cacert").arg(cp.ca());
        } else {
            c.arg("-k");
        }
        Ok(text(&c.arg(&url).output()?.stdout))
    };
    assert_eq!(curl(false)?, "000", "no certificate yet");
    cp.kubectl_ok(&["certificate", "approve", &csr])?;
    // Approved and signed: the node serves with it, and it chains to the cluster's CA (anonymous
    // is still refused), so the API server, which checks it, proxies to the node.
    cp.wait("the issued serving certificate in use", Duration::from_secs(30), || Ok(curl(true)? == "401"))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    let health = cp.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{}/proxy/healthz", node.name)])?;
    assert_eq!(health.trim(), "ok");
    assert!(node.root().join("pki/kubelet-server-current.pem").exists());
    Ok(())
}

fn pod_with(name: &str, node: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  tolerations: [{{operator: Exists}}]\n  restartPolicy: Never\n{spec}"
    )
}

fn wait_phase(cp: &ControlPlane, ns: &str, pod: &str, phase: &str, node: &WasmletNode) -> Result<Value> {
    wait_phase_within(cp, ns, pod, phase, node, Duration::from_secs(90))
}

/// Waits until the pod's phase is `phase`; its status then.
fn wait_phase_within(
    cp: &ControlPlane,
    ns: &str,
    pod: &str,
    phase: &str,
    node: &WasmletNode,
    limit: Duration,
) -> Result<Value> {
    let mut last = Value::Null;
    cp.wait(&format!("pod {pod} {phase}"), limit, || {
        last = cp.get_json(&["get", "pod", "-n", ns, pod])?;
        Ok(last["status"]["phase"] == phase)
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{last}\n{}", node.log()))?;
    Ok(last["status"].clone())
}

/// The node's memory, so that what pods may use of it (allocatable) can be set small.
fn mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn pods_are_evicted_for_their_emptydir_and_under_memory_pressure_by_the_kubelets_ranking() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    // What pods may use of the node's memory: 300Mi (the machine's, less systemReserved and
    // the 100Mi hard threshold), so a pod holding 250Mi leaves under the threshold.
    let reserved = mem_total() - (400 << 20);
    let config = format!(
        "{FAST}evictionPressureTransitionPeriod = \"5s\"\nsystemReserved = {{ memory = \"{}Ki\" }}\n",
        reserved / 1024
    );
    let node = WasmletNode::start(cp, "wasm-node-evict", &[(tool_module(), "tool:1")], &config)?;
    let n = wait_node_ready(cp, &node)?;
    let allocatable = n["status"]["allocatable"]["memory"].as_str().unwrap_or_default().to_string();
    assert_eq!(allocatable, "300Mi", "{n}");
    assert_eq!(node_condition(&n, "MemoryPressure").as_deref(), Some("False"));
    let ns = cp.namespace("evict")?;

    // An emptyDir past its sizeLimit: the pod is evicted at once, with upstream's message.
    let filler = "  volumes: [{name: scratch, emptyDir: {sizeLimit: 1Mi}}]\n  containers: [{name: c, image: tool:1, args: [fill, /scratch/f, \"2\"], volumeMounts: [{name: scratch, mountPath: /scratch}]}]\n";
    cp.apply(&ns, &pod_with("filler", &node.name, filler))?;
    let s = wait_phase(cp, &ns, "filler", "Failed", &node)?;
    assert_eq!(s["reason"], "Evicted", "{s}");
    assert_eq!(s["message"], "Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\". ", "{s}");

    // Memory: a Guaranteed pod within its request and a BestEffort one holding 250Mi; the
    // BestEffort one goes, the other runs on.
    let guard = "  containers: [{name: c, image: tool:1, args: [sleep, \"600\"], resources: {requests: {memory: 64Mi, cpu: 100m}, limits: {memory: 64Mi, cpu: 100m}}}]\n";
    cp.apply(&ns, &pod_with("guard", &node.name, guard))?;
    wait_phase(cp, &ns, "guard", "Running", &node)?;
    let hog = "  containers: [{name: c, image: tool:1, args: [hold, \"250\"]}]\n";
    cp.apply(&ns, &pod_with("hog", &node.name, hog))?;
    // MemoryPressure shows on the Node while the threshold is met and for the transition
    // period after.
    let mut pressure_seen = false;
    cp.wait("MemoryPressure True and hog evicted", Duration::from_secs(90), || {
        let n = cp.get_json(&["get", "node", &node.name])?;
        pressure_seen |= node_condition(&n, "MemoryPressure").as_deref() == Some("True");
        Ok(pressure_seen && cp.get_json(&["get", "pod", "-n", &ns, "hog"])?["status"]["phase"] == "Failed")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    let s = cp.get_json(&["get", "pod", "-n", &ns, "hog"])?["status"].clone();
    assert_eq!(s["reason"], "Evicted", "{s}");
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("The node was low on resource: memory. Threshold quantity: 100Mi, available: ")
            && message.contains(". Container c was using ")
            && message.ends_with(", request is 0, has larger consumption of memory. "),
        "{message}"
    );
    let disruption =
        s["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "DisruptionTarget").cloned();
    let disruption = disruption.unwrap_or_else(|| panic!("no DisruptionTarget in {s}"));
    assert_eq!(
        (disruption["status"].as_str(), disruption["reason"].as_str()),
        (Some("True"), Some("TerminationByKubelet"))
    );
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns, "--field-selector", "reason=Evicted", "-o", "name"])?;
    assert!(events.lines().count() >= 2, "an Evicted event for each: {events}");
    // Once the pod is gone and the transition period has passed, the pressure is over.
    cp.wait("MemoryPressure False again", Duration::from_secs(60), || {
        let n = cp.get_json(&["get", "node", &node.name])?;
        Ok(node_condition(&n, "MemoryPressure").as_deref() == Some("False"))
    })?;
    let g = cp.get_json(&["get", "pod", "-n", &ns, "guard"])?;
    assert_eq!(g["status"]["phase"], "Running", "{g}");
    assert_eq!(g["status"]["containerStatuses"][0]["restartCount"], 0, "{g}");
    Ok(())
}

/// The line numbers of `tool spew`'s lines in `text` (CRI records or plain lines).
fn spew_numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.split("line ").nth(1)?.get(..9)?.parse().ok()).collect()
}

fn consecutive(n: &[u64]) -> bool {
    n.windows(2).all(|w| w[1] == w[0] + 1)
}

#[test]
fn logs_rotate_under_a_100_mb_writer_and_kubectl_and_crictl_still_read_them() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let config = format!(
        "{FAST}containerLogMaxSize = \"10Mi\"\ncontainerLogMaxFiles = 3\ncontainerLogMonitorInterval = \"3s\"\n"
    );
    let node = WasmletNode::start(cp, "wasm-node-logs", &[(tool_module(), "tool:1")], &config)?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("logs")?;
    // 1,000,000 lines of 100 bytes, as fast as the guest can write them.
    let spewer = "  containers: [{name: c, image: tool:1, args: [spew, \"1000000\"]}]\n";
    cp.apply(&ns, &pod_with("spewer", &node.name, spewer))?;
    cp.wait("spewer started", Duration::from_secs(60), || {
        let p = cp.get_json(&["get", "pod", "-n", &ns, "spewer"])?;
        Ok(p["status"]["containerStatuses"][0]["containerID"].is_string())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    // kubectl logs -f follows the log across every rotation to the end.
    let mut follow = std::process::Command::new(cp.bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&cp.admin)
        .args(["logs", "-f", "-n", &ns, "spewer"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Read as it comes: a follower left behind would read files already rotated away.
    let mut stdout = follow.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).map(|_| v)
    });
    let pod = cp.get_json(&["get", "pod", "-n", &ns, "spewer"])?;
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    let dir = node.root().join("kubelet/logs").join(format!("{ns}_spewer_{uid}")).join("c");
    // What the container's logs hold on disk stays bounded while it writes: three files
    // (containerLogMaxFiles), each at most the log bound (twice containerLogMaxSize).
    let mut most = 0u64;
    cp.wait("spewer Succeeded", Duration::from_secs(180), || {
        let files: Vec<u64> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .collect();
        assert!(files.len() <= 3, "{} files in {}", files.len(), dir.display());
        most = most.max(files.iter().sum());
        Ok(cp.get_json(&["get", "pod", "-n", &ns, "spewer"])?["status"]["phase"] == "Succeeded")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    assert!(most <= 3 * ((20 << 20) + (64 << 10)), "{most} bytes on disk at most");
    assert!(node.log().contains("container log rotated"), "{}", node.log());

    // The files kept hold consecutive lines up to the last: nothing lost at a rotation.
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)?.flatten().map(|e| e.path()).collect();
    files.sort_by_key(|p| (p.file_name() == Some(std::ffi::OsStr::new("0.log")), p.clone()));
    assert_eq!(files.len(), 3, "{files:?}");
    let kept: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default()).collect();
    let numbers = spew_numbers(&kept);
    assert!(consecutive(&numbers) && numbers.last() == Some(&999_999), "{} lines kept", numbers.len());
    assert!(kept.ends_with(" stdout F spewed 1000000 lines\n"), "{}", &kept[kept.len().saturating_sub(200)..]);

    let out = follow.wait_with_output()?;
    let followed = text(&reader.join().expect("the reader")?);
    let numbers = spew_numbers(&followed);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        consecutive(&numbers) && numbers.last() == Some(&999_999),
        "{} lines followed from {:?}",
        numbers.len(),
        numbers.first()
    );
    assert!(followed.ends_with("spewed 1000000 lines\n"));

    // kubectl logs reads the live file; --tail and crictl logs see its end.
    let tail = cp.kubectl_ok(&["logs", "-n", &ns, "spewer", "--tail=2"])?;
    assert!(tail.starts_with("line 000999999 yyy") && tail.ends_with("y\nspewed 1000000 lines\n"), "{tail:?}");
    let all = cp.kubectl_ok(&["logs", "-n", &ns, "spewer"])?;
    let numbers = spew_numbers(&all);
    assert!(
        consecutive(&numbers) && numbers.last() == Some(&999_999) && numbers.len() < 1_000_000,
        "{}",
        numbers.len()
    );
    let id = pod["status"]["containerStatuses"][0]["containerID"].as_str().unwrap_or_default();
    let id = id.trim_start_matches("wasmlet://");
    let crictl = std::process::Command::new(cp.bin.join("crictl"))
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", node.cri_socket()?.display()))
        .args(["logs", "--tail", "1", id])
        .output()?;
    assert!(crictl.status.success(), "{crictl:?}");
    assert_eq!(text(&crictl.stdout), "spewed 1000000 lines\n", "{crictl:?}");
    Ok(())
}

/// A sample in Prometheus text: the value on the line that starts with `series` (name and
/// labels), and its timestamp in milliseconds if it has one.
fn stamped(text: &str, series: &str) -> Option<(f64, Option<i64>)> {
    let mut f = text.lines().find(|l| l.starts_with(series))?.strip_prefix(series)?.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next().and_then(|t| t.parse().ok())))
}

fn sample(text: &str, series: &str) -> Option<f64> {
    stamped(text, series).map(|(v, _)| v)
}

#[test]
fn stats_summary_and_resource_metrics_show_the_guests_known_load() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    // The API server's node proxy refuses loopback addresses.
    wasmlet_tests::cluster::local_address(wasmlet_tests::cluster::NODE_API_IP)?;
    let mut node = WasmletNode::prepare(cp, "wasm-node-top", &[(tool_module(), "tool:1")], FAST)?;
    node.ip = wasmlet_tests::cluster::NODE_API_IP.into();
    node.spawn()?;
    wait_node_ready(cp, &node)?;
    let ns = cp.namespace("top")?;
    // A CPU-bound guest held to 200m, and one that holds 50 MiB and sleeps.
    let burner = "  containers: [{name: c, image: tool:1, args: [loop], resources: {limits: {cpu: 200m}}}]\n";
    let holder = "  containers: [{name: c, image: tool:1, args: [hold, \"50\"]}]\n";
    // And one that writes 3 MiB into an emptyDir.
    let filler = "  volumes: [{name: cache, emptyDir: {}}]\n  containers: [{name: c, image: tool:1, args: [fill, /cache/f, \"3\"], volumeMounts: [{name: cache, mountPath: /cache}]}]\n";
    cp.apply(&ns, &pod_with("burner", &node.name, burner))?;
    cp.apply(&ns, &pod_with("holder", &node.name, holder))?;
    cp.apply(&ns, &pod_with("filler", &node.name, filler))?;
    wait_phase(cp, &ns, "burner", "Running", &node)?;
    wait_phase(cp, &ns, "holder", "Running", &node)?;
    wait_phase(cp, &ns, "filler", "Running", &node)?;
    let raw = |path: &str| cp.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{}/proxy{path}", node.name)]);
    let pod = |summary: &Value, name: &str| {
        summary["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["podRef"]["name"] == name && p["podRef"]["namespace"] == ns.as_str())
            .cloned()
            .unwrap_or_default()
    };
    // The rate needs readings a few seconds apart; until then the figure may be missing.
    let mut summary = Value::Null;
    cp.wait("a CPU rate for the burner", Duration::from_secs(60), || {
        summary = serde_json::from_str(&raw("/stats/summary")?)?;
        Ok(pod(&summary, "burner")["containers"][0]["cpu"]["usageNanoCores"].is_u64())
    })?;
    std::thread::sleep(Duration::from_secs(5));
    let summary: Value = serde_json::from_str(&raw("/stats/summary")?)?;
    let burner = pod(&summary, "burner");
    let cores = burner["containers"][0]["cpu"]["usageNanoCores"].as_u64().unwrap_or(0) as f64 / 1e9;
    assert!((0.18..=0.22).contains(&cores), "the burner uses {cores} cores: {burner}");
    let pod_cores = burner["cpu"]["usageNanoCores"].as_u64().unwrap_or(0) as f64 / 1e9;
    assert!((0.18..=0.22).contains(&pod_cores), "{burner}");
    let holder = pod(&summary, "holder");
    let ws = holder["containers"][0]["memory"]["workingSetBytes"].as_u64().unwrap_or(0);
    assert!(((50 << 20)..(52 << 20)).contains(&ws), "the holder's working set: {ws}: {holder}");
    assert_eq!(holder["memory"]["workingSetBytes"].as_u64(), Some(ws), "{holder}");
    assert!(summary["node"]["memory"]["workingSetBytes"].as_u64().unwrap_or(0) > ws, "{}", summary["node"]);
    // The pod's network: its own namespace's interface, with its counters.
    let net = &holder["network"];
    assert!(net["name"].as_str().is_some_and(|n| !n.is_empty()) && net["rxBytes"].is_u64(), "{holder}");
    assert_eq!(net["interfaces"][0]["name"], net["name"], "{holder}");

    // Disks, from the eviction manager's rounds (every 10 s): the emptyDir's 3 MiB, the
    // container's log line, no writable layer, and the node's filesystems.
    let (mut filler, mut summary) = (Value::Null, Value::Null);
    cp.wait("the filler's emptyDir in the summary", Duration::from_secs(60), || {
        summary = serde_json::from_str(&raw("/stats/summary")?)?;
        filler = pod(&summary, "filler");
        Ok(filler["volume"][0]["usedBytes"] == 3 << 20)
    })?;
    assert_eq!(filler["volume"][0]["name"], "cache", "{filler}");
    assert!(filler["volume"][0]["capacityBytes"].as_u64() > Some(3 << 20), "{filler}");
    let logs = filler["containers"][0]["logs"]["usedBytes"].as_u64().unwrap_or(0);
    // "filled /cache/f with 3 MiB" as one CRI log record.
    assert!((40..200).contains(&logs), "{filler}");
    assert_eq!(filler["containers"][0]["rootfs"]["usedBytes"], 0, "{filler}");
    let ephemeral = filler["ephemeral-storage"]["usedBytes"].as_u64().unwrap_or(0);
    assert!(ephemeral >= (3 << 20) + logs && ephemeral < (3 << 20) + (1 << 20), "{filler}");
    let fs = &summary["node"]["fs"];
    assert!(fs["capacityBytes"].as_u64() > fs["availableBytes"].as_u64() && fs["usedBytes"].as_u64() > Some(0), "{fs}");
    let images = summary["node"]["runtime"]["imageFs"]["usedBytes"].as_u64().unwrap_or(0);
    assert!(images >= std::fs::metadata(tool_module())?.len(), "{}", summary["node"]);

    // /metrics/resource, what metrics-server scrapes: the same working set, and CPU seconds
    // that grow by 0.2 a second.
    let series =
        |pod: &str| format!("container_cpu_usage_seconds_total{{container=\"c\",namespace=\"{ns}\",pod=\"{pod}\"}} ");
    let m0 = raw("/metrics/resource")?;
    std::thread::sleep(Duration::from_secs(5));
    let m1 = raw("/metrics/resource")?;
    // The rate between the two samples' own times, as metrics-server computes it.
    let (Some((c0, Some(t0))), Some((c1, Some(t1)))) =
        (stamped(&m0, &series("burner")), stamped(&m1, &series("burner")))
    else {
        panic!("no stamped burner samples in\n{m1}")
    };
    let rate = (c1 - c0) / ((t1 - t0) as f64 / 1e3);
    assert!((0.18..=0.22).contains(&rate), "{rate} cores from {c0} to {c1}\n{m1}");
    let ws_series = format!("container_memory_working_set_bytes{{container=\"c\",namespace=\"{ns}\",pod=\"holder\"}} ");
    let ws = sample(&m1, &ws_series).unwrap_or(0.0);
    assert!(((50 << 20) as f64..(52 << 20) as f64).contains(&ws), "{ws}\n{m1}");
    let pod_ws = format!("pod_memory_working_set_bytes{{namespace=\"{ns}\",pod=\"holder\"}} ");
    assert_eq!(sample(&m1, &pod_ws), Some(ws), "{m1}");
    assert!(sample(&m1, "node_cpu_usage_seconds_total ").unwrap_or(0.0) > 0.0, "{m1}");
    Ok(())
}

#[test]
fn image_gc_over_the_high_threshold_removes_unused_images_and_reports_on_the_node() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    // Any used disk is over 1%, and nothing brings it to 0%: the first round (at start) takes
    // every unused image and reports that it could not free enough.
    let config =
        format!("{FAST}imageGCHighThresholdPercent = 1\nimageGCLowThresholdPercent = 0\nimageMinimumGCAge = \"0s\"\n");
    let images = [(tool_module(), "tool:1"), (http_component(), "spare:1")];
    let node = WasmletNode::start(cp, "wasm-node-gc", &images, &config)?;
    wait_node_ready(cp, &node)?;
    let crictl = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(cp.bin.join("crictl"))
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", node.cri_socket()?.display()))
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "crictl {args:?}: {out:?}");
        Ok(text(&out.stdout))
    };
    cp.wait("the unused images removed", Duration::from_secs(60), || Ok(crictl(&["images", "-q"])?.trim().is_empty()))?;
    let selector = format!("reason=FreeDiskSpaceFailed,involvedObject.kind=Node,involvedObject.name={}", node.name);
    let mut events = String::new();
    cp.wait("the node's FreeDiskSpaceFailed event", Duration::from_secs(30), || {
        events = cp.kubectl_ok(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &selector,
            "-o",
            "jsonpath={.items[*].message}",
        ])?;
        Ok(!events.is_empty())
    })?;
    assert!(events.starts_with("Failed to garbage collect required amount of images. Attempted to free "), "{events}");
    assert!(events.contains("bytes, but only found ") && events.contains(" bytes eligible to free."), "{events}");
    // The node still serves: a pod whose image is gone waits for it, named.
    let ns = cp.namespace("gc")?;
    let pod = "  containers: [{name: c, image: tool:1, imagePullPolicy: Never, args: [sleep, \"60\"]}]\n";
    cp.apply(&ns, &pod_with("late", &node.name, pod))?;
    cp.wait("the pod waiting for its image", Duration::from_secs(60), || {
        let p: Value = serde_json::from_str(&cp.kubectl_ok(&["get", "pod", "-n", &ns, "late", "-o", "json"])?)?;
        Ok(p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImageNeverPull")
    })?;
    Ok(())
}

/// Lines of `kubectl exec POD -- CMD...` in `ns`: Ok(stdout) or Err(stderr) when it fails.
fn exec_in(cp: &ControlPlane, ns: &str, pod: &str, cmd: &[&str]) -> Result<std::result::Result<String, String>> {
    let mut args = vec!["exec", "-n", ns, pod, "--"];
    args.extend_from_slice(cmd);
    let out = cp.kubectl(&args)?;
    Ok(if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) })
}

/// How many answers each backend gave, from `connect-n`'s lines ("<pod> got <msg>").
fn backends(lines: &str) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for l in lines.lines().filter(|l| !l.is_empty()) {
        *seen.entry(l.split(" got ").next().unwrap_or(l).to_string()).or_insert(0) += 1;
    }
    seen
}

/// Services without kube-proxy: a wasm client reaches a Deployment of wasm servers through
/// its Service's ClusterIP and DNS name (the cluster DNS Service itself routed the same way),
/// balanced round robin; an endpoint that turns unready is taken out; ClientIP affinity
/// sticks; no endpoint, or a port name no slice has, refuses the connection; a slice of a
/// Service that does not exist changes nothing.
#[test]
fn services_route_guests_to_ready_endpoints_without_kube_proxy() -> Result<()> {
    let Some(cp) = ControlPlane::shared() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let net = wasmlet_tests::TestBridge::new(dir.path(), 's');
    let gateway = net.gateway();
    let ns = cp.namespace("svc")?;
    // The node stands in for kube-proxy, so it needs kube-proxy's rights (docs/architecture.md).
    cp.grant_node_proxier()?;
    // The cluster DNS: a Service with no selector whose slice points at the test's DNS
    // server on the bridge's address.
    let selectorless = |name: &str, proto: &str, port_name: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: {port_name}, port: {port}, protocol: {proto}}}]\n"
        )
    };
    let manual_slice = |name: &str, service: &str, proto: &str, port_name: &str, addr: &str, port: u16| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: wasmlet-test}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: {proto}}}]\nendpoints: [{{addresses: [\"{addr}\"], conditions: {{ready: true}}}}]\n"
        )
    };
    cp.apply(&ns, &selectorless("dns", "UDP", "dns", 53))?;
    cp.apply(&ns, &manual_slice("dns-1", "dns", "UDP", "dns", &gateway, 53))?;
    let dns_ip = cp.get_json(&["get", "service", "-n", &ns, "dns"])?["spec"]["clusterIP"].as_str().unwrap().to_string();
    // Bad input: a Service whose port name no slice has, and a slice of no Service.
    cp.apply(&ns, &selectorless("mismatch", "TCP", "http", 80))?;
    cp.apply(&ns, &manual_slice("mismatch-1", "mismatch", "TCP", "web", &gateway, 8080))?;
    cp.apply(&ns, &manual_slice("orphan-1", "no-such-service", "TCP", "http", &gateway, 8080))?;

    let bridge_config = std::fs::read_to_string(&net.config)?;
    let config = format!("{FAST}clusterDNS = [\"{dns_ip}\"]\n{bridge_config}");
    let node = WasmletNode::start(cp, "wasm-node-svc", &[(wasmlet_tests::net_component(), "net:1")], &config)?;
    wait_node_ready(cp, &node)?;
    let web = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      runtimeClassName: wasmlet
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: web
        image: net:1
        imagePullPolicy: IfNotPresent
        args: [serve, "8080"]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          exec: {{command: [ready, "8080"]}}
          periodSeconds: 1
          failureThreshold: 1
      - name: echo
        image: net:1
        imagePullPolicy: IfNotPresent
        args: [udp-echo, "5353"]
---
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  selector: {{app: web}}
  ports: [{{name: echo, port: 53, targetPort: 5353, protocol: UDP}}]
"#,
        node = node.name
    );
    cp.apply(&ns, &web)?;
    cp.apply(&ns, &wasmlet_tests::cluster::service_and_client("web", &node.name))?;
    wait_ready_replicas(cp, &ns, "web", 3, &node)?;
    cp.wait("the client running", Duration::from_secs(60), || {
        Ok(cp.get_json(&["get", "pod", "-n", &ns, "client"])?["status"]["phase"] == "Running")
    })?;
    let cluster_ip =
        cp.get_json(&["get", "service", "-n", &ns, "web"])?["spec"]["clusterIP"].as_str().unwrap().to_string();
    let name = format!("web.{ns}.svc.cluster.local");
    let ip: Vec<u8> = cluster_ip.split('.').map(|o| o.parse().unwrap()).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let Some(asked) = rt.block_on(wasmlet_tests::dns_server(&gateway, &[(&name, [ip[0], ip[1], ip[2], ip[3]])])) else {
        anyhow::bail!("the test DNS server needs root")
    };
    let connect =
        |host: &str, n: usize, msg: &str| exec_in(cp, &ns, "client", &["connect-n", host, "80", &n.to_string(), msg]);

    // Through the ClusterIP, once the node has the Service: round robin over the three.
    // (The slice's endpoints become ready one by one after the pods do.)
    cp.wait("the Service routed to all three", Duration::from_secs(30), || {
        Ok(connect(&cluster_ip, 6, "hello")?.is_ok_and(|a| backends(&a).len() == 3))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    let answers = connect(&cluster_ip, 12, "by-ip")?.map_err(|e| {
        let slices = cp.kubectl_ok(&["get", "endpointslices", "-n", &ns, "-o", "wide"]);
        let pods = cp.kubectl_ok(&["get", "pods", "-n", &ns, "-o", "wide"]);
        anyhow::anyhow!("{e}\n{slices:?}\n{pods:?}\n{}", node.log())
    })?;
    let seen = backends(&answers);
    assert_eq!(seen.len(), 3, "{answers}");
    assert!(seen.values().all(|&n| n == 4), "round robin: {seen:?}");
    // By its DNS name: the short name through the pod's search list, the query sent to the
    // cluster DNS Service's endpoint.
    let answers = connect("web", 3, "by-name")?.map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
    assert_eq!(backends(&answers).len(), 3, "{answers}");
    assert!(asked.lock().unwrap().contains(&name), "asked: {:?}", asked.lock().unwrap());

    // UDP to a ClusterIP, on a connected socket and on an unconnected one: the datagram goes
    // to an endpoint, and the guest sees the answer come from the Service's address.
    let echo_ip =
        cp.get_json(&["get", "service", "-n", &ns, "echo"])?["spec"]["clusterIP"].as_str().unwrap().to_string();
    let udp = |mode: &str| exec_in(cp, &ns, "client", &["udp-ask", &echo_ip, "53", "ping", mode]);
    let mut said = Ok(String::new());
    cp.wait("UDP through the ClusterIP", Duration::from_secs(30), || {
        said = udp("unconnected")?;
        Ok(said.as_ref().is_ok_and(|a| a.contains(" echoes ping from ")))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {said:?}\n{}", node.log()))?;
    let answer = said.map_err(anyhow::Error::msg)?;
    assert!(answer.trim().ends_with(&format!(" echoes ping from {echo_ip}:53")), "{answer}");
    let answer = udp("connected")?.map_err(anyhow::Error::msg)?;
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(lines.first(), Some(&format!("remote {echo_ip}:53").as_str()), "{answer}");
    assert!(lines.get(1).is_some_and(|l| l.ends_with(&format!(" echoes ping from {echo_ip}:53"))), "{answer}");
    let web_pods: Vec<String> =
        pods(cp, &ns, "app=web")?.iter().map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string()).collect();
    assert!(web_pods.iter().any(|p| lines[1].starts_with(&format!("{p} echoes"))), "{answer}: {web_pods:?}");

    // One endpoint turns unready: once the API says so, the node stops sending it anything.
    let victim = pods(cp, &ns, "app=web")?[0]["metadata"]["name"].as_str().unwrap().to_string();
    exec_in(cp, &ns, &victim, &["connect", "localhost", "8080", "set-unready"])?.map_err(anyhow::Error::msg)?;
    cp.wait("the endpoint unready", Duration::from_secs(30), || {
        Ok(!ready(&cp.get_json(&["get", "pod", "-n", &ns, &victim])?))
    })?;
    let unready_at = std::time::Instant::now();
    cp.wait("the unready endpoint taken out", Duration::from_secs(30), || {
        Ok(!connect(&cluster_ip, 3, "probe")?.map_err(anyhow::Error::msg)?.contains(&victim))
    })?;
    eprintln!("the unready endpoint was out {:?} after the API said so", unready_at.elapsed());
    let answers = connect(&cluster_ip, 8, "after")?.map_err(anyhow::Error::msg)?;
    let seen = backends(&answers);
    assert!(seen.len() == 2 && !seen.contains_key(&victim), "{seen:?}");

    // ClientIP affinity: every connection of the client goes to one endpoint.
    cp.kubectl_ok(&["patch", "service", "-n", &ns, "web", "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#])?;
    cp.wait("affinity", Duration::from_secs(30), || {
        Ok(backends(&connect(&cluster_ip, 6, "sticky")?.map_err(anyhow::Error::msg)?).len() == 1)
    })?;
    let first = backends(&connect(&cluster_ip, 6, "sticky")?.map_err(anyhow::Error::msg)?);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(backends(&connect("web", 6, "sticky")?.map_err(anyhow::Error::msg)?), first, "still the same one");

    // A Service port no slice port matches, and a Service with no endpoint: refused (14 is
    // wasi:sockets' connection-refused), as kube-proxy's REJECT.
    let mismatch =
        cp.get_json(&["get", "service", "-n", &ns, "mismatch"])?["spec"]["clusterIP"].as_str().unwrap().to_string();
    let e = connect(&mismatch, 1, "x")?.unwrap_err();
    assert!(e.contains("connect: error code 14"), "{e}");
    cp.kubectl_ok(&["scale", "-n", &ns, "deployment/web", "--replicas=0"])?;
    // Once the pods are gone and the Service's slices list no endpoint (a connection made
    // while one is going can hang on its vanishing address, as it would through kube-proxy).
    cp.wait("no web pod and no endpoint", Duration::from_secs(60), || {
        let slices = cp.get_json(&["get", "endpointslices", "-n", &ns, "-l", "kubernetes.io/service-name=web"])?;
        let empty = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|s| s["endpoints"].as_array().is_none_or(|e| e.is_empty()));
        Ok(empty && pods(cp, &ns, "app=web")?.is_empty())
    })?;
    let mut last = Ok(String::new());
    cp.wait("no endpoint refused", Duration::from_secs(30), || {
        last = connect(&cluster_ip, 1, "x")?;
        Ok(last.as_ref().is_err_and(|e| e.contains("connect: error code 14")))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {last:?}\n{}", node.log()))?;
    // UDP too: no endpoint, refused at the connect and at the send.
    for (mode, what) in [("connected", "udp stream"), ("unconnected", "udp send")] {
        let e = udp(mode)?.unwrap_err();
        assert!(e.contains(&format!("{what}: error code 14")), "{mode}: {e}");
    }
    // The node kept serving through all of it.
    assert!(node.log().lines().all(|l| !l.contains("panicked")), "{}", node.log());
    Ok(())
}
