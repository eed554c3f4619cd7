//! What every container of a pod sees besides its image: /etc/hosts, /etc/resolv.conf and
//! /etc/hostname as the sandbox asked, file mounts (the kubelet's own /etc/hosts, a termination
//! log), one volume shared by two containers, and nothing outside the mounts.

use std::path::Path;
use std::time::Duration;

use wasmlet_tests::*;

async fn run(
    rt: &mut RuntimeClient,
    sb: &str,
    cfg: &cri::PodSandboxConfig,
    mut c: cri::ContainerConfig,
    mounts: &[cri::Mount],
) -> (i32, Vec<String>, Vec<String>) {
    c.mounts = mounts.to_vec();
    let id = create(rt, sb, cfg, c).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
    let s = wait_exited(rt, &id, Duration::from_secs(30)).await.unwrap();
    let log = read_log(Path::new(&s.log_path)).unwrap();
    (s.exit_code, texts(&log, "stdout"), texts(&log, "stderr"))
}

fn mount(container_path: &str, host: &Path, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

#[tokio::test]
async fn etc_files_file_mounts_and_a_shared_volume() {
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let mut cfg = sandbox_config(&server, "files");
    cfg.hostname = "files-0".into();
    cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sb.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    let tool = |name: &str, args: &[&str]| container_config(name, "tool", args);

    let (code, out, _) = run(&mut rt, &sb, &cfg, tool("resolv", &["cat", "/etc/resolv.conf"]), &[]).await;
    assert_eq!(code, 0);
    assert_eq!(out, ["search default.svc.cluster.local svc.cluster.local", "nameserver 10.96.0.10", "options ndots:5"]);
    let (_, out, _) = run(&mut rt, &sb, &cfg, tool("hostname", &["cat", "/etc/hostname"]), &[]).await;
    assert_eq!(out, ["files-0"]);
    let (_, out, _) = run(&mut rt, &sb, &cfg, tool("hosts", &["cat", "/etc/hosts"]), &[]).await;
    assert!(out.contains(&"127.0.0.1\tlocalhost".to_string()), "{out:?}");
    assert_eq!(out.last().unwrap(), &format!("{ip}\tfiles-0"));

    // File mounts: the kubelet's own hosts file replaces the pod's; a termination log written
    // by the container reaches the host file.
    let host = server.dir.path().join("host-files");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("kubelet-hosts"), "10.1.2.3\tfrom-the-kubelet\n").unwrap();
    std::fs::write(host.join("termination-log"), "").unwrap();
    let file_mounts = [
        mount("/etc/hosts", &host.join("kubelet-hosts"), false),
        mount("/dev/termination-log", &host.join("termination-log"), false),
    ];
    let (_, out, _) = run(&mut rt, &sb, &cfg, tool("fm-hosts", &["cat", "/etc/hosts"]), &file_mounts).await;
    assert_eq!(out, ["10.1.2.3\tfrom-the-kubelet"]);
    let (_, out, _) = run(&mut rt, &sb, &cfg, tool("fm-resolv", &["cat", "/etc/resolv.conf"]), &file_mounts).await;
    assert_eq!(out.len(), 3, "the pod's resolv.conf is still there: {out:?}");
    let write = tool("fm-write", &["write", "/dev/termination-log", "finished: ok"]);
    let (code, _, err) = run(&mut rt, &sb, &cfg, write, &file_mounts).await;
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(std::fs::read_to_string(host.join("termination-log")).unwrap(), "finished: ok");
    // A read-only file mount refuses writes.
    let ro = [mount("/dev/termination-log", &host.join("termination-log"), true)];
    let (code, _, _) = run(&mut rt, &sb, &cfg, tool("fm-ro", &["write", "/dev/termination-log", "no"]), &ro).await;
    assert_eq!(code, 1);
    assert_eq!(std::fs::read_to_string(host.join("termination-log")).unwrap(), "finished: ok");

    // One volume, two containers: what the writer puts there, the reader reads.
    let vol = server.dir.path().join("volume");
    std::fs::create_dir_all(&vol).unwrap();
    let shared = [mount("/shared", &vol, false)];
    let (code, _, _) =
        run(&mut rt, &sb, &cfg, tool("writer", &["write", "/shared/msg", "from the writer"]), &shared).await;
    assert_eq!(code, 0);
    let (_, out, _) = run(&mut rt, &sb, &cfg, tool("reader", &["cat", "/shared/msg"]), &shared).await;
    assert_eq!(out, ["from the writer"]);

    // Symlinks inside a mount that point out of it lead nowhere.
    let secret = server.dir.path().join("secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    std::os::unix::fs::symlink(&secret, vol.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret", vol.join("rel-link")).unwrap();
    for (name, path) in [("abs", "/shared/abs-link"), ("rel", "/shared/rel-link"), ("dots", "/shared/../secret")] {
        let (code, out, _) = run(&mut rt, &sb, &cfg, tool(&format!("escape-{name}"), &["cat", path]), &shared).await;
        assert_eq!(code, 1, "{path}: {out:?}");
        assert!(out.is_empty(), "{path}: {out:?}");
    }
}

#[tokio::test]
async fn an_invalid_dns_config_is_refused() {
    let server = Server::start().await.unwrap();
    let mut rt = server.runtime().await;
    let mut cfg = sandbox_config(&server, "bad-dns");
    cfg.dns_config = Some(cri::DnsConfig { servers: vec![], searches: vec![], options: vec!["ndots:many".into()] });
    let e = run_sandbox(&mut rt, &cfg).await.unwrap_err();
    let status = e.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("ndots:many") && status.message().contains("bad-dns"), "{}", status.message());
    // Still serving, and the name was not taken.
    cfg.dns_config = None;
    run_sandbox(&mut rt, &cfg).await.unwrap();
}
