//! The `cni` network mode, as a node runs it (root): Debian's CNI plugins (bridge + host-local)
//! give each pod a routable IP on a bridge; the host reaches pods at their IPs, pods reach each
//! other and the host, and StopPodSandbox gives everything back.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn ask(addr: &str, msg: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(msg.as_bytes()).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

/// A container of pod `sb` connects to a server the test runs on the host's address `gateway`,
/// which sees the connection come from `pod_ip`.
async fn pod_reaches_the_host(
    rt: &mut RuntimeClient,
    (sb, cfg): (&str, &cri::PodSandboxConfig),
    gateway: &str,
    pod_ip: &str,
) {
    let listener = std::net::TcpListener::bind(format!("{gateway}:0")).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let host_side = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(format!("host got {}", String::from_utf8_lossy(&buf[..n])).as_bytes()).unwrap();
        peer.ip().to_string()
    });
    let name = format!("outbound-{}", gateway.replace('.', "-"));
    let c = start(rt, sb, cfg, net_config(&name, &["connect", gateway, &port, "hello-host"])).await;
    assert_eq!(stdout_of(rt, &c).await, ["host got hello-host"]);
    assert_eq!(host_side.join().unwrap(), pod_ip, "the connection came from the pod's address");
}

/// Stops and removes the sandboxes `ids`, then checks that no veth is left on `bridge`.
async fn remove_leaving_no_veth(rt: &mut RuntimeClient, ids: &[&str], bridge: &str) {
    for id in ids {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() }).await.unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() }).await.unwrap();
    }
    let links = Command::new("ip").args(["-o", "link", "show", "master", bridge]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&links.stdout).trim().is_empty(),
        "veths left: {}",
        String::from_utf8_lossy(&links.stdout)
    );
}

#[tokio::test]
async fn pods_on_a_cni_bridge() {
    if skip_unless_root("the cni mode needs root") {
        return;
    }
    let tag = format!("{:04x}", std::process::id() & 0xffff);
    let bridge = format!("wlt{tag}");
    let third = std::process::id() % 200 + 20;
    let subnet = format!("10.231.{third}.0/24");
    let gateway = format!("10.231.{third}.1");
    let dir = tempfile::tempdir().unwrap();
    let config = cni_config(dir.path(), &bridge, &subnet, "bridge");
    let server = Server::start_with(&["--config", config.to_str().unwrap()]).await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let cond = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap().conditions;
    let network = cond.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(network.status && network.message.contains("cni: network wasmlet-test"), "{network:?}");

    let host_port = free_port();
    let a_cfg = with_ports(sandbox_config(&server, "cni-a"), &[(8080, host_port as i32)]);
    let a = run_sandbox(&mut rt, &a_cfg).await.unwrap();
    let b_cfg = sandbox_config(&server, "cni-b");
    let b = run_sandbox(&mut rt, &b_cfg).await.unwrap();
    let (a_ip, b_ip) = (pod_ip(&mut rt, &a).await, pod_ip(&mut rt, &b).await);
    let prefix = format!("10.231.{third}.");
    assert!(a_ip.starts_with(&prefix) && b_ip.starts_with(&prefix) && a_ip != b_ip, "{a_ip} {b_ip}");
    // The host reaches the pod on the plugin's bridge, never by its default route.
    ensure_on_device(&a_ip, &bridge).unwrap();

    let server_a = start(&mut rt, &a, &a_cfg, net_config("server", &["serve", "8080"])).await;
    wait_log(&mut rt, &server_a, "listening on 8080", WAIT).await.unwrap();
    // The pod IP is routable from the host; the host port works too.
    let direct = format!("{a_ip}:8080");
    assert_eq!(tokio::task::spawn_blocking(move || ask(&direct, "direct")).await.unwrap(), "cni-a got direct");
    let mapped = format!("127.0.0.1:{host_port}");
    assert_eq!(tokio::task::spawn_blocking(move || ask(&mapped, "mapped")).await.unwrap(), "cni-a got mapped");
    // Pod to pod by IP.
    let c = start(&mut rt, &b, &b_cfg, net_config("client", &["connect", &a_ip, "8080", "from-b"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["cni-a got from-b"]);
    // Out of the pod to a server on the host, at the bridge's gateway address.
    pod_reaches_the_host(&mut rt, (&b, &b_cfg), &gateway, &b_ip).await;

    // Stop and remove: the veths leave the bridge, the addresses go back, nothing is pinned.
    remove_leaving_no_veth(&mut rt, &[&a, &b], &bridge).await;
    let leases: Vec<String> = std::fs::read_dir(dir.path().join("ipam/wasmlet-test"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(leases.is_empty(), "addresses still held: {leases:?}");
    assert_eq!(std::fs::read_dir(server.run_dir().join("netns")).map(|d| d.count()).unwrap_or(0), 0);
    std::net::TcpListener::bind(("0.0.0.0", host_port)).expect("host port released");
    let _ = Command::new("ip").args(["link", "del", &bridge]).status();
}

#[tokio::test]
async fn a_missing_cni_plugin_is_reported() {
    if skip_unless_root("the cni mode needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = cni_config(dir.path(), "wltmissing", "10.232.0.0/24", "no-such-plugin");
    let server = Server::start_with(&["--config", config.to_str().unwrap()]).await.unwrap();
    let mut rt = server.runtime().await;
    let cond = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap().conditions;
    let network = cond.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(!network.status, "{network:?}");
    assert!(network.message.contains("\"no-such-plugin\"") && network.message.contains("not found"), "{network:?}");
    let e = run_sandbox(&mut rt, &sandbox_config(&server, "no-net")).await.unwrap_err();
    let status = e.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("no-such-plugin"), "{}", status.message());
    // Host-network pods still run.
    let mut host = sandbox_config(&server, "host-net");
    host_network(&mut host);
    run_sandbox(&mut rt, &host).await.unwrap();
}

/// The bridge mode, the default as root: with no CNI at all, every pod IP that the runtime
/// reports is on wasmlet's own bridge, so the host reaches it there and never routes it out.
#[tokio::test]
async fn pods_on_wasmlets_own_bridge() {
    if skip_unless_root("the bridge mode needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = TestBridge::new(dir.path(), 'b');
    let (bridge, gateway, prefix) = (net.name.clone(), net.gateway(), net.prefix.clone());
    // Another address of the host, off the bridge, there before the pods start.
    let other = OutsideNetns::new('b');
    let config = net.config.clone();
    let mut server = Server::start_with(&["--config", config.to_str().unwrap()]).await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let cond = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap().conditions;
    let network = cond.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(network.status && network.message.contains(&format!("bridge {bridge}")), "{network:?}");

    let (a_cfg, b_cfg) = (sandbox_config(&server, "br-a"), sandbox_config(&server, "br-b"));
    let a = run_sandbox(&mut rt, &a_cfg).await.unwrap();
    let b = run_sandbox(&mut rt, &b_cfg).await.unwrap();
    let (a_ip, b_ip) = (pod_ip(&mut rt, &a).await, pod_ip(&mut rt, &b).await);
    assert!(a_ip.starts_with(&prefix) && b_ip.starts_with(&prefix) && a_ip != b_ip, "{a_ip} {b_ip}");
    // Each pod IP resolves to the bridge, not to the host's default route.
    for ip in [&a_ip, &b_ip] {
        ensure_on_device(ip, &bridge).unwrap();
    }

    let server_a = start(&mut rt, &a, &a_cfg, net_config("server", &["serve", "8080"])).await;
    wait_log(&mut rt, &server_a, "listening on 8080", WAIT).await.unwrap();
    let direct = format!("{a_ip}:8080");
    assert_eq!(tokio::task::spawn_blocking(move || ask(&direct, "direct")).await.unwrap(), "br-a got direct");
    // Pod to pod by IP, across the bridge.
    let c = start(&mut rt, &b, &b_cfg, net_config("client", &["connect", &a_ip, "8080", "from-b"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["br-a got from-b"]);
    // Out of the pod to the host, at the gateway and at another of its addresses, from the
    // pod's own address.
    pod_reaches_the_host(&mut rt, (&b, &b_cfg), &gateway, &b_ip).await;
    pod_reaches_the_host(&mut rt, (&b, &b_cfg), &other.host_address, &b_ip).await;
    // Nothing else: with no NAT out, an address of another machine is unreachable in the pod
    // (asked of the pod's routing table: nothing is sent), whatever the host's ip_forward.
    let pinned = server.run_dir().join("netns").join(&b);
    let route = Command::new("nsenter")
        .arg(format!("--net={}", pinned.display()))
        .args(["ip", "-o", "route", "get", "192.0.2.1"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&route.stdout), String::from_utf8_lossy(&route.stderr));
    assert!(!route.status.success() && said.contains("No route to host"), "{}: {said}", pinned.display());

    // A restart keeps the pods' networks as they were.
    server.kill9();
    server.spawn().await.unwrap();
    let mut rt = server.runtime().await;
    assert_eq!(pod_ip(&mut rt, &a).await, a_ip);
    let again = start(&mut rt, &a, &a_cfg, net_config("server-again", &["serve", "8080"])).await;
    wait_log(&mut rt, &again, "listening on 8080", WAIT).await.unwrap();
    let direct = format!("{a_ip}:8080");
    assert_eq!(tokio::task::spawn_blocking(move || ask(&direct, "again")).await.unwrap(), "br-a got again");

    // Stop and remove: the veths leave the bridge, nothing is pinned, the address is free.
    remove_leaving_no_veth(&mut rt, &[&a, &b], &bridge).await;
    assert_eq!(std::fs::read_dir(server.run_dir().join("netns")).map(|d| d.count()).unwrap_or(0), 0);
    let c_cfg = sandbox_config(&server, "br-c");
    let c = run_sandbox(&mut rt, &c_cfg).await.unwrap();
    assert_eq!(pod_ip(&mut rt, &c).await, a_ip, "the lowest free address again");
    // The server goes first, then the test's bridge.
    drop(server);
    drop(net);
}

/// The bridge with `masquerade = true`: a pod reaches a server in a namespace the test makes
/// (standing for another machine, reached through the host's routes), and the server sees the
/// host's address, not the pod's.
#[tokio::test]
async fn bridge_pods_go_out_masqueraded_when_asked() {
    if skip_unless_root("the bridge mode needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = TestBridge::new(dir.path(), 'm');
    let config = std::fs::read_to_string(&net.config).unwrap();
    std::fs::write(&net.config, format!("{config}masquerade = true\n")).unwrap();
    let outside = OutsideNetns::new('m');
    let server = Server::start_with(&["--config", net.config.to_str().unwrap()]).await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "masq");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let ip = pod_ip(&mut rt, &sb).await;
    let listener = outside.answer_once(7070);
    let c = start(&mut rt, &sb, &cfg, net_config("out", &["connect", &outside.address, "7070", "hi"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, [format!("outside saw {}", outside.host_address)], "the pod is {ip}");
    listener.join().unwrap();
    let table = format!("wasmlet_{}", net.name);
    let rules = Command::new("nft").args(["list", "table", "ip", &table]).output().unwrap();
    assert!(String::from_utf8_lossy(&rules.stdout).contains("masquerade"), "{rules:?}");
    remove_leaving_no_veth(&mut rt, &[&sb], &net.name).await;
    drop(server);
    let _ = Command::new("nft").args(["delete", "table", "ip", &table]).output();
    drop(net);
}

/// GET `path` from the host port `port` until it answers (the handler may not listen yet).
async fn get_when_up(port: u16, path: String) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let p = path.clone();
        match tokio::task::spawn_blocking(move || http_get(port, &p)).await.unwrap() {
            Ok(answer) if answer.starts_with("HTTP/1.") => return answer,
            other => {
                assert!(std::time::Instant::now() < deadline, "{path}: no answer: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Outgoing wasi:http: a handler component calls its own localhost, another pod by IP and by
/// name (the pod's DNS), an HTTPS server with the test's own CA (trusted through SSL_CERT_FILE)
/// and one with a certificate nobody signed; it gets clear error codes for a refused port, a
/// name that does not exist and a server that never answers; the body streams through.
#[tokio::test]
async fn a_wasi_http_component_calls_out() {
    if skip_unless_root("the bridge mode needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = TestBridge::new(dir.path(), 'o');
    let gateway = net.gateway();
    let Some(_asked) = dns_server("127.77.0.2", &[]).await else { panic!("root binds port 53") };
    // The test's CA, and a server certificate from it for the gateway's address.
    let pki = dir.path();
    wasmlet_tests::cluster::self_signed(pki, "/CN=wasmlet test CA", 2, "ca.key", "ca.crt").unwrap();
    wasmlet_tests::cluster::certificate(pki, "good", "/CN=good", Some(&format!("IP:{gateway}"))).unwrap();
    wasmlet_tests::cluster::self_signed(pki, "/CN=unknown", 2, "bad.key", "bad.crt").unwrap();
    let ca = pki.join("ca.crt");
    let server =
        Server::start_with_env(&["--config", net.config.to_str().unwrap()], &[("SSL_CERT_FILE", ca.to_str().unwrap())])
            .await
            .unwrap();
    server.import(http_component(), "http").unwrap();
    let mut rt = server.runtime().await;

    let mut handler = container_config("web", "http", &[]);
    handler.command.clear();
    let host_port = free_port();
    let mut web_cfg = with_ports(sandbox_config(&server, "web"), &[(8080, host_port as i32)]);
    web_cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["127.77.0.2".into()],
        searches: vec!["ns.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let back_cfg = sandbox_config(&server, "back");
    let web = run_sandbox(&mut rt, &web_cfg).await.unwrap();
    let back = run_sandbox(&mut rt, &back_cfg).await.unwrap();
    start(&mut rt, &web, &web_cfg, handler.clone()).await;
    start(&mut rt, &back, &back_cfg, handler).await;
    let back_ip = pod_ip(&mut rt, &back).await;
    let fetch = |url: String| get_when_up(host_port, format!("/fetch/{url}"));

    // Its own localhost, and the other pod by IP (over the bridge).
    let answer = fetch("http://localhost:8080/self".into()).await;
    assert!(answer.ends_with("fetched 200: hello from wasi:http: /self"), "{answer}");
    let answer = fetch(format!("http://{back_ip}:8080/other")).await;
    assert!(answer.ends_with("fetched 200: hello from wasi:http: /other"), "{answer}");
    // A name the pod's DNS does not know: NXDOMAIN, after the search list.
    let answer = fetch("http://nowhere:8080/".into()).await;
    assert!(answer.starts_with("HTTP/1.0 502") && answer.ends_with("fetch error 1 NXDOMAIN"), "{answer}");
    // A port nobody listens on: connection refused (6).
    let answer = fetch("http://127.0.0.1:1/".into()).await;
    assert!(answer.ends_with("fetch error 6"), "{answer}");

    // HTTPS on the host, at the bridge's address: trusted through the test's CA, refused with
    // a certificate error (13) when the certificate is nobody's.
    let (good_port, bad_port) = (free_port(), free_port());
    let s_server = |port: u16, name: &str| {
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &format!("{gateway}:{port}")])
            .args(["-cert", &format!("{name}.crt"), "-key", &format!("{name}.key")])
            .current_dir(pki)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut servers = [s_server(good_port, "good"), s_server(bad_port, "bad")];
    for port in [good_port, bad_port] {
        let addr: std::net::SocketAddr = format!("{gateway}:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "openssl s_server on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let answer = fetch(format!("https://{gateway}:{good_port}/")).await;
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.contains("fetched 200: ") && answer.contains("s_server"),
        "{answer}"
    );
    let answer = fetch(format!("https://{gateway}:{bad_port}/")).await;
    assert!(answer.ends_with("fetch error 13"), "{answer}");
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }

    // A server that accepts and never answers: the guest's first-byte timeout (9).
    let silent = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let answer = get_when_up(host_port, format!("/fetch-quick/http://{gateway}:{silent_port}/")).await;
    assert!(answer.ends_with("fetch error 9"), "{answer}");
    drop(silent);

    // The body streams: the second chunk is sent only once the client has the first.
    let origin = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let origin_port = origin.local_addr().unwrap().port();
    let (saw_first, wait_first) = std::sync::mpsc::channel::<()>();
    let origin = std::thread::spawn(move || {
        let (mut c, _) = origin.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = c.read(&mut request).unwrap();
        c.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\npart1 \r\n").unwrap();
        wait_first.recv_timeout(WAIT).expect("the client saw the first chunk");
        c.write_all(b"5\r\npart2\r\n0\r\n\r\n").unwrap();
    });
    let mut client = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!("GET /fetch/http://{gateway}:{origin_port}/stream HTTP/1.0\r\nHost: web\r\n\r\n");
    client.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("part1") {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "ended before the first chunk: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    saw_first.send(()).unwrap();
    client.read_to_end(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.ends_with("fetched 200: part1 part2"), "{got}");
    origin.join().unwrap();
}
