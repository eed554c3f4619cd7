//! Pod networking in the default mode (bridge as root, rootless otherwise): a network namespace
//! per pod, the pod IP, host ports, localhost between siblings, host-network pods, and nothing
//! left behind.

use std::io::{Read, Write};
use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// Sends `msg` to 127.0.0.1:`port` on the host and returns the answer.
fn ask(port: u16, msg: &str) -> std::io::Result<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(WAIT))?;
    c.write_all(msg.as_bytes())?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    Ok(answer)
}

#[tokio::test]
async fn pods_have_networks_of_their_own() {
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let cond = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap().conditions;
    let network = cond.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    // The default mode: wasmlet's own bridge as root; rootless otherwise, where pods have no
    // IP the host can reach, which NetworkReady says.
    if is_root() {
        assert!(network.status && network.message.starts_with("bridge: "), "{network:?}");
    } else {
        assert!(!network.status && network.reason == "RootlessPodNetwork", "{network:?}");
    }

    // Two pods, both listening on 8080 at once; only pod a maps a host port.
    let host_port = free_port();
    let a_cfg = with_ports(sandbox_config(&server, "pod-a"), &[(8080, host_port as i32)]);
    let a = run_sandbox(&mut rt, &a_cfg).await.unwrap();
    let b_cfg = with_ports(sandbox_config(&server, "pod-b"), &[(8080, 0)]);
    let b = run_sandbox(&mut rt, &b_cfg).await.unwrap();
    let a_server = start(&mut rt, &a, &a_cfg, net_config("server", &["serve", "8080"])).await;
    let b_server = start(&mut rt, &b, &b_cfg, net_config("server", &["serve", "8080"])).await;
    wait_log(&mut rt, &a_server, "listening on 8080", WAIT).await.unwrap();
    wait_log(&mut rt, &b_server, "listening on 8080", WAIT).await.unwrap();

    // Each pod has its own address from the pod range.
    let (a_ip, b_ip) = (pod_address(&mut rt, &a).await, pod_address(&mut rt, &b).await);
    assert_eq!(pod_ip(&mut rt, &a).await, if is_root() { a_ip.as_str() } else { "" }, "reported where reachable");
    assert!(a_ip.starts_with("10.88.") && b_ip.starts_with("10.88.") && a_ip != b_ip, "{a_ip} {b_ip}");

    // From the host through the host port: pod a answers.
    let answer = tokio::task::spawn_blocking(move || ask(host_port, "from-host")).await.unwrap().unwrap();
    assert_eq!(answer, "pod-a got from-host");

    // Siblings reach each other on localhost and on the pod IP; each pod reaches its own server.
    let c = start(&mut rt, &a, &a_cfg, net_config("client", &["connect", "localhost", "8080", "sibling"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["pod-a got sibling"]);
    let c = start(&mut rt, &a, &a_cfg, net_config("client-ip", &["connect", &a_ip, "8080", "by-ip"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["pod-a got by-ip"]);
    let c = start(&mut rt, &b, &b_cfg, net_config("client", &["connect", "127.0.0.1", "8080", "in-b"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["pod-b got in-b"]);

    // A pod does not see another pod's address (b has only its own), nor the host's listeners.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_only = host_listener.local_addr().unwrap().port().to_string();
    let c = start(&mut rt, &b, &b_cfg, net_config("probe", &["connect", "127.0.0.1", &host_only, "x"])).await;
    let s = wait_exited(&mut rt, &c, WAIT).await.unwrap();
    assert_ne!(s.exit_code, 0, "a pod must not reach the host's loopback listeners");

    // Stopping the pod frees its host port at once.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: a.clone() }).await.unwrap();
    std::net::TcpListener::bind(("0.0.0.0", host_port)).expect("host port released by StopPodSandbox");
}

#[tokio::test]
async fn bad_network_requests_are_refused_and_the_runtime_keeps_serving() {
    let server = Server::start().await.unwrap();
    let mut rt = server.runtime().await;
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port() as i32;
    for (cfg, code, says) in [
        (with_ports(sandbox_config(&server, "dup"), &[(80, 0), (80, 0)]), Code::InvalidArgument, "declared twice"),
        (with_ports(sandbox_config(&server, "two"), &[(80, 9999), (81, 9999)]), Code::InvalidArgument, "mapped twice"),
        (with_ports(sandbox_config(&server, "taken"), &[(80, taken_port)]), Code::FailedPrecondition, "cannot listen"),
    ] {
        let e = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(cfg.clone()), runtime_handler: String::new() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        let name = cfg.metadata.as_ref().unwrap().name.clone();
        assert!(e.message().contains(says) && e.message().contains(&name), "{}", e.message());
    }
    // Nothing was kept, and the names are free to use.
    let items = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    assert!(items.is_empty());
    run_sandbox(&mut rt, &sandbox_config(&server, "taken")).await.unwrap();
}

#[tokio::test]
async fn a_host_network_pod_listens_on_the_host() {
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let mut cfg = sandbox_config(&server, "hostnet");
    host_network(&mut cfg);
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    assert_eq!(pod_ip(&mut rt, &sb).await, "", "a host-network pod has the node's address, not one of its own");
    let port = free_port();
    let id = start(&mut rt, &sb, &cfg, net_config("server", &["serve", &port.to_string()])).await;
    wait_log(&mut rt, &id, "listening on", WAIT).await.unwrap();
    let answer = tokio::task::spawn_blocking(move || ask(port, "on-host")).await.unwrap().unwrap();
    assert_eq!(answer, "hostnet got on-host");
}

#[tokio::test]
async fn two_hundred_pods_leave_nothing_behind() {
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", server.pid())).unwrap().count();
    let pins = || std::fs::read_dir(server.root().join("netns")).map(|d| d.count()).unwrap_or(0);
    let host_port = free_port() as i32;
    let mut ips = std::collections::BTreeSet::new();
    let mut fds_after_first = 0;
    for i in 0..200 {
        let cfg = with_ports(sandbox_config(&server, &format!("p{i}")), &[(8080, host_port)]);
        let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
        ips.insert(pod_address(&mut rt, &sb).await);
        let c = start(&mut rt, &sb, &cfg, net_config("lookup", &["lookup", "localhost"])).await;
        assert_eq!(stdout_of(&mut rt, &c).await, ["127.0.0.1", "0:0:0:0:0:0:0:1"], "the pod's hosts file");
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() }).await.unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb }).await.unwrap();
        if i == 0 {
            fds_after_first = fds();
        }
    }
    // The same host port every time: each stop released it. One address, reused.
    assert_eq!(ips.len(), 1, "{ips:?}");
    assert_eq!(pins(), 0, "no pinned namespace left");
    // Descriptors: the pool of ready namespaces and the runtime's own files, nothing per pod.
    let now = fds();
    assert!(now <= fds_after_first + 4, "descriptors grew from {fds_after_first} to {now}");
    std::net::TcpListener::bind(("0.0.0.0", host_port as u16)).expect("host port free after the last pod");
}

#[tokio::test]
async fn rootless_mode_works_without_privilege() {
    // As `nobody`: wasmlet enters a user namespace of its own and makes the pods' namespaces.
    if !is_root() {
        // Not root here, so the other tests of this file already ran without privilege.
        return;
    }
    // "The world outside": a namespace of the test's own, with an HTTPS server whose
    // certificate comes from the test's CA, which wasmlet trusts through SSL_CERT_FILE.
    let outside = OutsideNetns::new('r');
    let pki = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(pki.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    wasmlet_tests::cluster::self_signed(pki.path(), "/CN=wasmlet test CA", 2, "ca.key", "ca.crt").unwrap();
    let san = format!("IP:{}", outside.address);
    wasmlet_tests::cluster::certificate(pki.path(), "good", "/CN=outside", Some(&san)).unwrap();
    let ca = pki.path().join("ca.crt");
    let server =
        Server::start_unprivileged_with_env(&[("SSL_CERT_FILE", ca.to_str().unwrap())]).await.unwrap().unwrap();
    server.import(net_component(), "net").unwrap();
    server.import(http_component(), "http").unwrap();
    let mut rt = server.runtime().await;
    let cond = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap().conditions;
    let network = cond.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    // Pods run, but a kubelet that needs pod IPs the host can reach is told there are none.
    assert!(!network.status && network.reason == "RootlessPodNetwork", "{network:?}\n{}", server.server_log());
    assert!(network.message.contains("run wasmlet as root"), "{network:?}");
    let host_port = free_port();
    let cfg = with_ports(sandbox_config(&server, "nobody-pod"), &[(8080, host_port as i32)]);
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    // No pod IP is reported (the host would route it away); the pod has its address inside.
    assert_eq!(pod_ip(&mut rt, &sb).await, "");
    assert!(pod_address(&mut rt, &sb).await.starts_with("10.88."));
    let id = start(&mut rt, &sb, &cfg, net_config("server", &["serve", "8080"])).await;
    wait_log(&mut rt, &id, "listening on 8080", WAIT).await.unwrap();
    let answer = tokio::task::spawn_blocking(move || ask(host_port, "unprivileged")).await.unwrap().unwrap();
    assert_eq!(answer, "nobody-pod got unprivileged");
    let c = start(&mut rt, &sb, &cfg, net_config("client", &["connect", "localhost", "8080", "sibling"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["nobody-pod got sibling"]);

    // A way out (pasta): the pod reaches a server in a namespace of the test's own, over the
    // host's routes; the server sees the host's address, not the pod's.
    let port = 7000 + (std::process::id() % 1000) as u16;
    let server_thread = outside.answer_once(port);
    let c = start(&mut rt, &sb, &cfg, net_config("out", &["connect", &outside.address, &port.to_string(), "hi"])).await;
    let lines = stdout_of(&mut rt, &c).await;
    assert_eq!(lines, [format!("outside saw {}", outside.host_address)], "{}", server.server_log());
    server_thread.join().unwrap();
    // Another pod's address is unreachable from here at once: it exists only in that pod, and
    // is never sent off through the host's default route.
    let c = start(&mut rt, &sb, &cfg, net_config("other-pod", &["connect", "10.88.200.200", "8080", "x"])).await;
    let s = wait_exited(&mut rt, &c, WAIT).await.unwrap();
    let log = read_log(std::path::Path::new(&s.log_path)).unwrap();
    assert!(texts(&log, "stderr").iter().any(|l| l == "connect: error code 13"), "{log:?}");

    // Outgoing wasi:http from a rootless pod: to the other pod through its host port at the
    // gateway (pasta maps it to the host), and to the HTTPS server outside.
    let web_port = free_port();
    let web_cfg = with_ports(sandbox_config(&server, "web-r"), &[(8080, web_port as i32)]);
    let web = run_sandbox(&mut rt, &web_cfg).await.unwrap();
    let mut handler = container_config("web", "http", &[]);
    handler.command.clear();
    start(&mut rt, &web, &web_cfg, handler).await;
    let fetch = |url: String| async move {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let path = format!("/fetch/{url}");
            match tokio::task::spawn_blocking(move || http_get(web_port, &path)).await.unwrap() {
                Ok(a) if a.starts_with("HTTP/1.") => return a,
                other => {
                    assert!(std::time::Instant::now() < deadline, "{url}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    let answer = fetch(format!("http://10.88.0.1:{host_port}/other-pod")).await;
    assert!(answer.ends_with("fetched 200: nobody-pod got a request\n"), "{answer}\n{}", server.server_log());
    let tls_port = port + 1;
    let mut s_server = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.name, "openssl", "s_server", "-quiet", "-www"])
        .args(["-accept", &format!("{}:{tls_port}", outside.address), "-cert", "good.crt", "-key", "good.key"])
        .current_dir(pki.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("{}:{tls_port}", outside.address).parse().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "openssl s_server on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = fetch(format!("https://{addr}/")).await;
    let _ = s_server.kill();
    let _ = s_server.wait();
    assert!(answer.contains("fetched 200: ") && answer.contains("s_server"), "{answer}");
}

#[tokio::test]
async fn guest_name_lookups_follow_the_pod_dns_config() {
    let Some(asked) = dns_server("127.77.0.1", &[("web.ns.svc.cluster.local", [10, 99, 0, 7])]).await else {
        eprintln!("skipped: binding port 53 needs root");
        return;
    };
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let mut cfg = sandbox_config(&server, "dns-pod");
    cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["127.77.0.1".into()],
        searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
        // (One attempt of a second: the malformed answer below waits that long, not 10 s.)
        options: vec!["ndots:5".into(), "timeout:1".into(), "attempts:1".into()],
    });
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let ip = pod_address(&mut rt, &sb).await;
    // A short name: the search list is applied (ndots:5), and the pod's server answers.
    let c = start(&mut rt, &sb, &cfg, net_config("web", &["lookup", "web"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["10.99.0.7"]);
    assert_eq!(asked.lock().unwrap().first().map(String::as_str), Some("web.ns.svc.cluster.local"));
    // The pod's hosts entries come first: its own name, and localhost.
    let c = start(&mut rt, &sb, &cfg, net_config("self", &["lookup", "dns-pod"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, [ip]);
    let c = start(&mut rt, &sb, &cfg, net_config("local", &["lookup", "localhost"])).await;
    assert!(stdout_of(&mut rt, &c).await.contains(&"127.0.0.1".to_string()));
    // A name nobody knows fails after every search suffix was tried; the host's resolver is
    // never asked.
    asked.lock().unwrap().clear();
    let c = start(&mut rt, &sb, &cfg, net_config("nowhere", &["lookup", "nowhere"])).await;
    let s = wait_exited(&mut rt, &c, WAIT).await.unwrap();
    assert_eq!(s.exit_code, 1);
    let seen = asked.lock().unwrap().clone();
    for name in ["nowhere.ns.svc.cluster.local", "nowhere.svc.cluster.local", "nowhere"] {
        assert!(seen.contains(&name.to_string()), "{name} not asked: {seen:?}");
    }
    // An answer too big for UDP (truncated) is asked again over TCP.
    let c = start(&mut rt, &sb, &cfg, net_config("big", &["lookup", "big.example."])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["10.99.0.99"]);
    // A malformed answer is no answer: the guest's lookup fails, and the next one works.
    let c = start(&mut rt, &sb, &cfg, net_config("garbage", &["lookup", "garbage.example."])).await;
    let s = wait_exited(&mut rt, &c, WAIT).await.unwrap();
    assert_eq!(s.exit_code, 1, "{s:?}");
    let c = start(&mut rt, &sb, &cfg, net_config("web-again", &["lookup", "web"])).await;
    assert_eq!(stdout_of(&mut rt, &c).await, ["10.99.0.7"]);
}

/// GET `path` from `addr` (HTTP/1.0, so the answer ends with the connection).
#[tokio::test]
async fn a_wasi_http_component_serves_the_pod_port() {
    let server = Server::start().await.unwrap();
    server.import(http_component(), "http").unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let host_port = free_port();
    let cfg = with_ports(sandbox_config(&server, "web"), &[(8080, host_port as i32)]);
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let mut web = container_config("web", "http", &[]);
    web.command.clear();
    let web = start(&mut rt, &sb, &cfg, web).await;
    // From the host through the host port, once the server listens.
    let addr = format!("127.0.0.1:{host_port}");
    let deadline = std::time::Instant::now() + WAIT;
    let answer = loop {
        match tokio::task::spawn_blocking(move || http_get(host_port, "/hello?x=1")).await.unwrap() {
            Ok(answer) if answer.starts_with("HTTP/1.") => break answer,
            other => {
                assert!(std::time::Instant::now() < deadline, "no answer: {other:?}\n{}", server.server_log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
    assert!(answer.ends_with("hello from wasi:http: /hello?x=1"), "{answer}");
    // From a sibling over localhost, with wasi:sockets.
    let get = "GET /from-sibling HTTP/1.0\r\nHost: web\r\n\r\n";
    let c = start(&mut rt, &sb, &cfg, net_config("client", &["connect", "localhost", "8080", get])).await;
    let lines = stdout_of(&mut rt, &c).await;
    assert!(lines.first().is_some_and(|l| l.starts_with("HTTP/1.0 200 OK")), "{lines:?}");
    // A second handler on the same port of the same pod: StartContainer fails and says why
    // (the listener is bound before StartContainer answers).
    let mut twin = container_config("twin", "http", &[]);
    twin.command.clear();
    let twin = create(&mut rt, &sb, &cfg, twin).await.unwrap();
    let e = rt.start_container(cri::StartContainerRequest { container_id: twin.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("listen on 0.0.0.0:8080"), "{}", e.message());
    let s = status(&mut rt, &twin).await.unwrap();
    assert_eq!((s.exit_code, s.reason.as_str()), (128, "StartError"));
    // Many requests, each its own instance.
    for i in 0..20 {
        let answer =
            tokio::task::spawn_blocking(move || http_get(host_port, &format!("/n/{i}"))).await.unwrap().unwrap();
        assert!(answer.ends_with(&format!("/n/{i}")), "{answer}");
    }
    // Exec into a handler needs a .wasm to run: it is not a command.
    let e = rt
        .exec_sync(cri::ExecSyncRequest { container_id: web.clone(), cmd: vec!["x".into()], timeout: 5 })
        .await
        .unwrap_err();
    assert!(e.message().contains("not a command"), "{}", e.message());
    // A client that keeps its connection open after a request (HTTP/1.1 keep-alive).
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    idle.write_all(b"GET /keep HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
    let mut first = [0u8; 64];
    let n = idle.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&first[..n]));
    // A stop drains: the handler stops accepting, closes idle connections and ends by itself
    // (0, not killed at the end of the grace period with 137).
    rt.stop_container(cri::StopContainerRequest { container_id: web.clone(), timeout: 30 }).await.unwrap();
    let s = status(&mut rt, &web).await.unwrap();
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 0, "Completed")
    );
    // The host port is the sandbox's and still accepts; nothing answers behind it.
    let after = tokio::task::spawn_blocking(move || http_get(host_port, "/")).await.unwrap();
    assert!(after.as_ref().map_or(true, |a| a.is_empty()), "no longer served: {after:?}");
}

#[tokio::test]
async fn a_udp_host_port_reaches_the_pod() {
    let server = Server::start().await.unwrap();
    server.import(net_component(), "net").unwrap();
    let mut rt = server.runtime().await;
    let host_port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = sandbox_config(&server, "udp-pod");
    cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Udp as i32,
        container_port: 5353,
        host_port: host_port as i32,
        host_ip: "127.0.0.1".into(),
    }];
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let echo = start(&mut rt, &sb, &cfg, net_config("echo", &["udp-echo", "5353"])).await;
    wait_log(&mut rt, &echo, "udp listening on 5353", WAIT).await.unwrap();
    let answers = tokio::task::spawn_blocking(move || {
        // Two clients: each gets its own answers back.
        let mut out = Vec::new();
        for who in ["one", "two"] {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.send_to(who.as_bytes(), ("127.0.0.1", host_port)).unwrap();
            let mut buf = [0u8; 256];
            let n = c.recv(&mut buf).unwrap();
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(answers, ["udp-pod echoes one", "udp-pod echoes two"]);
    // SCTP host ports are refused, saying so.
    let mut sctp = sandbox_config(&server, "sctp-pod");
    sctp.port_mappings =
        vec![cri::PortMapping { protocol: 2, container_port: 9, host_port: 9999, host_ip: String::new() }];
    let e = run_sandbox(&mut rt, &sctp).await.unwrap_err();
    let status = e.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("SCTP"), "{}", status.message());
}
