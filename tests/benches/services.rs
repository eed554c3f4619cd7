//! Services without kube-proxy, measured (run by `bash bench/services.sh`, which builds the
//! release binary first): on a `wasmlet node` in a real cluster, a wasm client pod makes
//! REQUESTS requests to a wasm server pod, one TCP connection each, through the Service's
//! ClusterIP (wasmlet picks the endpoint at connect) and to the pod IP directly, alternating
//! rounds in one run. Prints requests/s and the p50/p99 latency each way, as the client
//! measures them with its monotonic clock.

use std::time::Duration;

use wasmlet_tests::cluster::{ControlPlane, WasmletNode};

fn main() {
    let Some(cp) = ControlPlane::shared() else {
        eprintln!("the Kubernetes binaries are missing: bash bench/services.sh unpacks them");
        return;
    };
    let requests: usize = wasmlet_tests::bench_env("REQUESTS", 2000);
    let rounds: usize = wasmlet_tests::bench_env("ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let net = wasmlet_tests::TestBridge::new(dir.path(), 'v');
    cp.grant_node_proxier().expect("grant the node proxier role");
    let config =
        format!("[node]\nnodeStatusUpdateFrequency = \"2s\"\n{}", std::fs::read_to_string(&net.config).unwrap());
    let node = WasmletNode::start(cp, "wasm-node-bench-svc", &[(wasmlet_tests::net_component(), "net:1")], &config)
        .expect("start the node");
    let ns = cp.namespace("bench-svc").unwrap();
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: server, labels: {{app: server}}}}
spec:
  runtimeClassName: wasmlet
  nodeName: {node}
  containers: [{{name: s, image: net:1, args: [serve, "8080"], ports: [{{name: http, containerPort: 8080}}]}}]
"#,
        node = node.name
    );
    cp.apply(&ns, &manifest).unwrap();
    cp.apply(&ns, &wasmlet_tests::cluster::service_and_client("server", &node.name)).unwrap();
    let running = |name: &str| {
        cp.get_json(&["get", "pod", "-n", &ns, name]).map(|p| p["status"]["phase"] == "Running").unwrap_or(false)
    };
    cp.wait("pods running", Duration::from_secs(120), || Ok(running("server") && running("client")))
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let pod_ip =
        cp.get_json(&["get", "pod", "-n", &ns, "server"]).unwrap()["status"]["podIP"].as_str().unwrap().to_string();
    let cluster_ip = cp.get_json(&["get", "service", "-n", &ns, "server"]).unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let bench = |host: &str, port: &str, n: usize| -> String {
        let out =
            cp.kubectl(&["exec", "-n", &ns, "client", "--", "bench-connect", host, port, &n.to_string(), "x"]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Once the node routes the Service (its EndpointSlice becomes ready after the pod).
    cp.wait("the Service routed", Duration::from_secs(60), || {
        Ok(cp.kubectl(&["exec", "-n", &ns, "client", "--", "connect", &cluster_ip, "80", "x"])?.status.success())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    // Warm both paths, then alternate.
    bench(&pod_ip, "8080", requests / 10);
    bench(&cluster_ip, "80", requests / 10);
    println!("{requests} requests per round, one connection each, client and server wasm pods on one node");
    // Which goes first alternates: a round's second run meets the first one's TIME_WAIT sockets.
    for round in 1..=rounds {
        let direct = || println!("round {round} direct    {pod_ip}:8080  {}", bench(&pod_ip, "8080", requests));
        let service = || println!("round {round} clusterIP {cluster_ip}:80  {}", bench(&cluster_ip, "80", requests));
        if round % 2 == 1 {
            direct();
            service();
        } else {
            service();
            direct();
        }
    }
}
