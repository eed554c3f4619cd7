//! Bad input gets a clear gRPC error naming the object, and the server keeps serving with
//! nothing stored lost.

use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

async fn still_serving(server: &Server) {
    let mut rt = server.runtime().await;
    rt.version(cri::VersionRequest { version: "0.1.0".into() }).await.expect("server still answers");
}

#[tokio::test]
async fn bad_wasm_and_non_wasm_images() {
    let server = Server::start().await.unwrap();
    let dir = server.dir.path();

    // Not wasm at all: the import refuses it and says what it saw.
    let text = dir.join("script.sh");
    std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    let out = server.wasmlet(&["image", "import", &text.display().to_string(), "--tag", "script"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("script: not a wasm module or component"), "{err}");

    // A wasm header with a truncated body: stored, but CreateContainer says it is invalid wasm.
    let mut truncated = std::fs::read(tool_module()).unwrap();
    truncated.truncate(truncated.len() / 2);
    let path = dir.join("truncated.wasm");
    std::fs::write(&path, truncated).unwrap();
    server.import(&path, "truncated").unwrap();
    // An image whose stored bytes were swapped for something else.
    let id = server.import(tool_component(), "swapped").unwrap();
    let blob = server.root().join("images/blobs/sha256").join(id.trim_start_matches("sha256:"));
    std::fs::write(&blob, b"not what was stored").unwrap();

    let good = server.import(tool_module(), "good").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "bad-images");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let e = create(&mut rt, &sb, &cfg, container_config("t", "truncated", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("docker.io/library/truncated:latest: invalid wasm"), "{}", e.message());
    let e = create(&mut rt, &sb, &cfg, container_config("s", "swapped", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("digest mismatch"), "{}", e.message());
    let e = create(&mut rt, &sb, &cfg, container_config("m", "missing:1", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("missing:1"), "{}", e.message());
    let e = create(&mut rt, &sb, &cfg, container_config("u", "UPPER", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("invalid image reference \"UPPER\""), "{}", e.message());

    // The good image still runs.
    let c = create(&mut rt, &sb, &cfg, container_config("ok", &good, &["hello"])).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: c.clone() }).await.unwrap();
    assert_eq!(wait_exited(&mut rt, &c, Duration::from_secs(30)).await.unwrap().exit_code, 0);
    still_serving(&server).await;
}

#[tokio::test]
async fn bad_container_configs() {
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "bad-configs");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();

    let mut escaping = container_config("esc", "tool", &[]);
    escaping.log_path = "../../../etc/evil.log".into();
    let e = create(&mut rt, &sb, &cfg, escaping).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("escapes the log directory"), "{}", e.message());
    let mut absolute = container_config("abs", "tool", &[]);
    absolute.log_path = "/etc/evil.log".into();
    assert_eq!(create(&mut rt, &sb, &cfg, absolute).await.unwrap_err().code(), Code::InvalidArgument);
    assert!(!std::path::Path::new("/etc/evil.log").exists());

    let mut missing_mount = container_config("mnt", "tool", &[]);
    let host = server.dir.path().join("does-not-exist");
    missing_mount.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }];
    let e = create(&mut rt, &sb, &cfg, missing_mount).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mount /data") && e.message().contains("does-not-exist"), "{}", e.message());

    let mut no_metadata = container_config("x", "tool", &[]);
    no_metadata.metadata = None;
    assert_eq!(create(&mut rt, &sb, &cfg, no_metadata).await.unwrap_err().code(), Code::InvalidArgument);
    let e = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: None,
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // The same name and attempt twice in one sandbox.
    create(&mut rt, &sb, &cfg, container_config("twice", "tool", &[])).await.unwrap();
    let e = create(&mut rt, &sb, &cfg, container_config("twice", "tool", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // Containers cannot be created in a stopped sandbox.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() }).await.unwrap();
    let e = create(&mut rt, &sb, &cfg, container_config("late", "tool", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    still_serving(&server).await;
}

#[tokio::test]
async fn unknown_ids_and_sandbox_requests() {
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let ghost = "0".repeat(64);

    let e = rt.pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: ghost.clone(), verbose: false }).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    let cfg = sandbox_config(&server, "ghost");
    let e = create(&mut rt, &ghost, &cfg, container_config("c", "tool", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(&ghost));
    for e in [
        rt.start_container(cri::StartContainerRequest { container_id: ghost.clone() }).await.err(),
        rt.container_status(cri::ContainerStatusRequest { container_id: ghost.clone(), verbose: false }).await.err(),
        rt.container_stats(cri::ContainerStatsRequest { container_id: ghost.clone() }).await.err(),
        rt.exec_sync(cri::ExecSyncRequest { container_id: ghost.clone(), cmd: vec!["x".into()], timeout: 1 })
            .await
            .err(),
        rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: ghost.clone() }).await.err(),
        rt.pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: ghost.clone() }).await.err(),
    ] {
        let e = e.expect("must fail");
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());
        assert!(e.message().contains(&ghost), "names the id: {}", e.message());
    }
    // ...while the idempotent ones succeed.
    rt.stop_container(cri::StopContainerRequest { container_id: ghost.clone(), timeout: 0 }).await.unwrap();
    rt.remove_container(cri::RemoveContainerRequest { container_id: ghost.clone() }).await.unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: ghost.clone() }).await.unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: ghost.clone() }).await.unwrap();
    let mut img = server.images().await;
    img.remove_image(cri::RemoveImageRequest {
        image: Some(cri::ImageSpec { image: "nothing:here".into(), ..Default::default() }),
    })
    .await
    .unwrap();

    // A second RunPodSandbox with the same metadata while the first is ready.
    let first = run_sandbox(&mut rt, &cfg).await.unwrap();
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(cfg.clone()), runtime_handler: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains(&first), "{}", e.message());

    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config(&server, "h")),
            runtime_handler: "runc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown runtime handler \"runc\""), "{}", e.message());
    let e = rt.run_pod_sandbox(cri::RunPodSandboxRequest { config: None, runtime_handler: String::new() }).await;
    assert_eq!(e.unwrap_err().code(), Code::InvalidArgument);
    let mut relative_logs = sandbox_config(&server, "rel");
    relative_logs.log_directory = "relative/dir".into();
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(relative_logs), runtime_handler: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Nothing stored was disturbed.
    let items = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    assert_eq!(items.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), [first]);
}

#[tokio::test]
async fn socket_rules() {
    let mut server = Server::start().await.unwrap();
    let socket = server.socket();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A second server on the same live socket is refused.
    let out = std::process::Command::new(wasmlet_bin())
        .args(["cri", "--root"])
        .arg(server.dir.path().join("other-root"))
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another server is listening"));
    still_serving(&server).await;

    // After a kill -9 the socket file is stale: a new server replaces it.
    server.kill9();
    assert!(socket.exists());
    server.spawn().await.unwrap();
    assert!(server.alive());
    still_serving(&server).await;
}
