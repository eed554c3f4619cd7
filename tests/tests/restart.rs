//! kill -9 of the server and a restart on the same root: nothing a client was told is lost.

use std::path::Path;
use std::time::Duration;

use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn kill9_and_restart_keeps_everything() {
    let mut server = Server::start().await.unwrap();
    let image = server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "survivor");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let stopped_cfg = sandbox_config(&server, "stopped");
    let stopped_sb = run_sandbox(&mut rt, &stopped_cfg).await.unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: stopped_sb.clone() }).await.unwrap();

    let exited = create(&mut rt, &sb, &cfg, container_config("exited", "tool", &["exit", "3"])).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: exited.clone() }).await.unwrap();
    let before = wait_exited(&mut rt, &exited, WAIT).await.unwrap();
    let running = create(&mut rt, &sb, &cfg, container_config("running", "tool", &["loop"])).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: running.clone() }).await.unwrap();
    let created = create(&mut rt, &sb, &cfg, container_config("created", "tool", &["hello"])).await.unwrap();
    let running_log = status(&mut rt, &running).await.unwrap().log_path;
    let deadline = std::time::Instant::now() + WAIT;
    while read_log(Path::new(&running_log)).map(|l| l.is_empty()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(rt);

    server.kill9();
    let log_before = server.server_log();
    server.spawn().await.unwrap();
    let mut rt = server.runtime().await;

    // Sandboxes with their state, labels and annotations.
    let items = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    assert_eq!(items.len(), 2);
    let s = items.iter().find(|s| s.id == sb).unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(s.labels, cfg.labels);
    assert_eq!(s.annotations, cfg.annotations);
    let s = items.iter().find(|s| s.id == stopped_sb).unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxNotready as i32);

    // The exited container: same exit code, times and log.
    let after = status(&mut rt, &exited).await.unwrap();
    assert_eq!(after, before);
    assert_eq!(texts(&read_log(Path::new(&after.log_path)).unwrap(), "stdout"), ["exiting with 3"]);

    // The running one is reported exited, saying why; its log is kept.
    let s = status(&mut rt, &running).await.unwrap();
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 255, "Unknown")
    );
    assert!(s.message.contains("wasmlet stopped while the container was running"), "{}", s.message);
    assert_eq!(texts(&read_log(Path::new(&s.log_path)).unwrap(), "stdout"), ["looping"]);

    // The created one still starts, from the compiled-code cache (no compilation after restart).
    let s = status(&mut rt, &created).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert_eq!(s.image_id, image);
    rt.start_container(cri::StartContainerRequest { container_id: created.clone() }).await.unwrap();
    let s = wait_exited(&mut rt, &created, WAIT).await.unwrap();
    assert_eq!(s.exit_code, 0);
    let log_after = server.server_log()[log_before.len()..].to_string();
    assert!(log_before.contains("compiled wasm"), "the first server compiled");
    assert!(!log_after.contains("compiled wasm"), "the restarted server must not compile:\n{log_after}");

    // The image store too, and the sandbox name stays reserved.
    let mut img = server.images().await;
    let listed = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(listed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), [image]);
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(cfg.clone()), runtime_handler: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
}
