//! The pod and container lifecycle over the real socket: every RuntimeService RPC, filters,
//! idempotence, NotFound, and the image bookkeeping.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn runtime_answers_what_a_kubelet_checks() {
    let server = Server::start().await.unwrap();
    let mut rt = server.runtime().await;
    let v = rt.version(cri::VersionRequest { version: "0.1.0".into() }).await.unwrap().into_inner();
    assert_eq!(v.version, "0.1.0");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.runtime_name, "wasmlet");
    assert!(!v.runtime_version.is_empty());

    let s = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let conditions: HashMap<_, _> = s.status.unwrap().conditions.into_iter().map(|c| (c.r#type, c.status)).collect();
    assert_eq!(conditions.get("RuntimeReady"), Some(&true));
    assert_eq!(conditions.get("NetworkReady"), Some(&true));
    let handlers: Vec<_> = s.runtime_handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(handlers, ["", "wasmlet"]);
    let features = s.runtime_handlers[0].features.unwrap();
    assert!(features.recursive_read_only_mounts);
    assert!(!features.user_namespaces);
    assert!(s.info.contains_key("root"));

    let c = rt.runtime_config(cri::RuntimeConfigRequest {}).await.unwrap().into_inner();
    assert_eq!(c.linux.unwrap().cgroup_driver, cri::CgroupDriver::Cgroupfs as i32);
    rt.update_runtime_config(cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig { pod_cidr: "10.88.0.0/16".into() }),
        }),
    })
    .await
    .unwrap();

    for (what, code) in [
        (rt.exec(cri::ExecRequest::default()).await.err(), Code::InvalidArgument),
        (rt.attach(cri::AttachRequest::default()).await.err(), Code::InvalidArgument),
        (rt.port_forward(cri::PortForwardRequest::default()).await.err(), Code::InvalidArgument),
        (rt.checkpoint_container(cri::CheckpointContainerRequest::default()).await.err(), Code::Unimplemented),
    ] {
        let e = what.expect("must refuse");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().len() > 20, "says why: {}", e.message());
    }
    let d = rt.list_metric_descriptors(cri::ListMetricDescriptorsRequest {}).await.unwrap().into_inner();
    assert!(d.descriptors.iter().all(|d| d.label_keys.starts_with(&["id".into(), "name".into(), "image".into()])));
    let m = rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {}).await.unwrap().into_inner();
    assert!(m.pod_metrics.is_empty(), "no pods, no metrics");
}

#[tokio::test]
async fn sandbox_lifecycle_filters_and_idempotence() {
    let server = Server::start().await.unwrap();
    let mut rt = server.runtime().await;
    let a_cfg = sandbox_config(&server, "a");
    let b_cfg = sandbox_config(&server, "b");
    let a = run_sandbox(&mut rt, &a_cfg).await.unwrap();
    let b = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(b_cfg.clone()), runtime_handler: "wasmlet".into() })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    assert_ne!(a, b);

    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: a.clone(), verbose: true })
        .await
        .unwrap()
        .into_inner();
    let status = st.status.unwrap();
    assert_eq!(status.id, a);
    assert_eq!(status.metadata.as_ref().unwrap(), a_cfg.metadata.as_ref().unwrap());
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    assert!(status.created_at > 0);
    assert_eq!(status.labels, a_cfg.labels);
    assert_eq!(status.annotations, a_cfg.annotations);
    assert!(st.info.contains_key("info"));
    assert!(st.timestamp > 0);

    let lister = rt.clone();
    let list = |f: cri::PodSandboxFilter| {
        let mut rt = lister.clone();
        async move {
            let items =
                rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(f) }).await.unwrap().into_inner().items;
            let mut ids: Vec<String> = items.into_iter().map(|i| i.id).collect();
            ids.sort();
            ids
        }
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(list(Default::default()).await, both);
    assert_eq!(list(cri::PodSandboxFilter { id: a.clone(), ..Default::default() }).await, vec![a.clone()]);
    let sel = HashMap::from([("app".to_string(), "b".to_string())]);
    assert_eq!(list(cri::PodSandboxFilter { label_selector: sel, ..Default::default() }).await, vec![b.clone()]);
    let all = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    let b_item = all.iter().find(|i| i.id == b).unwrap();
    assert_eq!(b_item.runtime_handler, "wasmlet");
    assert_eq!(b_item.annotations, b_cfg.annotations);

    // Streaming variant returns the same items.
    let mut stream =
        rt.stream_pod_sandboxes(cri::StreamPodSandboxesRequest { filter: None }).await.unwrap().into_inner();
    let mut streamed = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        streamed.extend(msg.pod_sandboxes.into_iter().map(|s| s.id));
    }
    streamed.sort();
    assert_eq!(streamed, both);

    // Stop twice, then filter by state.
    for _ in 0..2 {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: a.clone() }).await.unwrap();
    }
    let not_ready = cri::PodSandboxStateValue { state: cri::PodSandboxState::SandboxNotready as i32 };
    assert_eq!(list(cri::PodSandboxFilter { state: Some(not_ready), ..Default::default() }).await, vec![a.clone()]);
    let ready = cri::PodSandboxStateValue { state: cri::PodSandboxState::SandboxReady as i32 };
    assert_eq!(list(cri::PodSandboxFilter { state: Some(ready), ..Default::default() }).await, vec![b.clone()]);

    // Remove twice; then it is gone (NotFound), and its name can be used again.
    for _ in 0..2 {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: a.clone() }).await.unwrap();
    }
    let e = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: a.clone(), verbose: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: a.clone() }).await.unwrap();
    let again = run_sandbox(&mut rt, &a_cfg).await.unwrap();
    assert_ne!(again, a);
}

#[tokio::test]
async fn container_lifecycle_filters_stats_and_idempotence() {
    let server = Server::start().await.unwrap();
    let image = server.import(tool_module(), "tool:1").unwrap();
    let mut rt = server.runtime().await;
    let sb_cfg = sandbox_config(&server, "pod");
    let sb = run_sandbox(&mut rt, &sb_cfg).await.unwrap();

    let mut looper_cfg = container_config("looper", "tool:1", &["loop"]);
    looper_cfg.annotations = HashMap::from([("k".to_string(), "v".to_string())]);
    looper_cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 64 << 20, ..Default::default() }),
        security_context: None,
    });
    let looper = create(&mut rt, &sb, &sb_cfg, looper_cfg.clone()).await.unwrap();
    let hello = create(&mut rt, &sb, &sb_cfg, container_config("hello", "tool:1", &["hello"])).await.unwrap();

    // Created: listed with its image id, status complete.
    let s = status(&mut rt, &looper).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert_eq!(s.metadata.as_ref().unwrap().name, "looper");
    assert_eq!(s.image_id, image);
    assert_eq!(s.image.as_ref().unwrap().image, "docker.io/library/tool:1");
    assert!(!s.image_ref.is_empty());
    assert_eq!(s.labels, looper_cfg.labels);
    assert_eq!(s.annotations, looper_cfg.annotations);
    assert!(s.created_at > 0 && s.started_at == 0);
    assert_eq!(s.resources.unwrap().linux.unwrap().memory_limit_in_bytes, 64 << 20);
    assert!(s.log_path.ends_with("looper/0.log"), "{}", s.log_path);

    rt.start_container(cri::StartContainerRequest { container_id: looper.clone() }).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: hello.clone() }).await.unwrap();
    let e = rt.start_container(cri::StartContainerRequest { container_id: looper.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    wait_exited(&mut rt, &hello, WAIT).await.unwrap();
    let s = status(&mut rt, &looper).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    assert!(s.started_at >= s.created_at);

    let lister = rt.clone();
    let list = |f: cri::ContainerFilter| {
        let mut rt = lister.clone();
        async move {
            let mut ids: Vec<String> = rt
                .list_containers(cri::ListContainersRequest { filter: Some(f) })
                .await
                .unwrap()
                .into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let mut both = vec![looper.clone(), hello.clone()];
    both.sort();
    assert_eq!(list(Default::default()).await, both);
    assert_eq!(list(cri::ContainerFilter { pod_sandbox_id: sb.clone(), ..Default::default() }).await, both);
    assert!(list(cri::ContainerFilter { pod_sandbox_id: "nope".into(), ..Default::default() }).await.is_empty());
    assert_eq!(list(cri::ContainerFilter { id: hello.clone(), ..Default::default() }).await, vec![hello.clone()]);
    let running = cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 };
    assert_eq!(list(cri::ContainerFilter { state: Some(running), ..Default::default() }).await, vec![looper.clone()]);
    let exited = cri::ContainerStateValue { state: cri::ContainerState::ContainerExited as i32 };
    assert_eq!(list(cri::ContainerFilter { state: Some(exited), ..Default::default() }).await, vec![hello.clone()]);
    let sel = HashMap::from([("container".to_string(), "hello".to_string())]);
    assert_eq!(list(cri::ContainerFilter { label_selector: sel, ..Default::default() }).await, vec![hello.clone()]);
    let listed = rt.list_containers(cri::ListContainersRequest { filter: None }).await.unwrap().into_inner();
    assert!(listed.containers.iter().all(|c| c.image_id == image && c.pod_sandbox_id == sb));

    // Stats: the looper burns CPU and has memory; the sandbox sums its containers.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = rt
        .container_stats(cri::ContainerStatsRequest { container_id: looper.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(st.attributes.as_ref().unwrap().id, looper);
    assert!(st.cpu.as_ref().unwrap().usage_core_nano_seconds.unwrap().value > 0);
    let mem = st.memory.as_ref().unwrap();
    assert!(mem.working_set_bytes.unwrap().value > 0);
    assert!(mem.available_bytes.unwrap().value < 64 << 20);
    let all = rt.list_container_stats(cri::ListContainerStatsRequest { filter: None }).await.unwrap().into_inner();
    assert_eq!(all.stats.len(), 1, "only running containers");
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: sb.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let linux = ps.linux.unwrap();
    assert_eq!(linux.containers.len(), 2);
    assert!(linux.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert_eq!(linux.process.unwrap().process_count.unwrap().value, 1);
    let lps = rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None }).await.unwrap().into_inner();
    assert_eq!(lps.stats.len(), 1);
    // And as metrics under cAdvisor's names: the limit, memory held.
    let metrics = rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {}).await.unwrap().into_inner();
    let of_looper =
        metrics.pod_metrics.iter().flat_map(|p| &p.container_metrics).find(|c| c.container_id == looper).unwrap();
    let metric = |n: &str| of_looper.metrics.iter().find(|m| m.name == n).unwrap().value.unwrap().value;
    assert_eq!(metric("container_spec_memory_limit_bytes"), 64 << 20);
    assert!(metric("container_memory_working_set_bytes") > 0);

    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: looper.clone(),
        linux: Some(cri::LinuxContainerResources { memory_limit_in_bytes: 128 << 20, ..Default::default() }),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = status(&mut rt, &looper).await.unwrap();
    assert_eq!(s.resources.unwrap().linux.unwrap().memory_limit_in_bytes, 128 << 20);

    // Stop (forcibly: the guest never ends) and stop again; remove twice.
    rt.stop_container(cri::StopContainerRequest { container_id: looper.clone(), timeout: 0 }).await.unwrap();
    let s = status(&mut rt, &looper).await.unwrap();
    assert_eq!((s.state, s.exit_code), (cri::ContainerState::ContainerExited as i32, 137));
    assert!(s.finished_at >= s.started_at);
    rt.stop_container(cri::StopContainerRequest { container_id: looper.clone(), timeout: 0 }).await.unwrap();
    let e = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: looper.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for _ in 0..2 {
        rt.remove_container(cri::RemoveContainerRequest { container_id: looper.clone() }).await.unwrap();
    }
    assert_eq!(status(&mut rt, &looper).await.unwrap_err().downcast::<tonic::Status>().unwrap().code(), Code::NotFound);
    rt.stop_container(cri::StopContainerRequest { container_id: looper.clone(), timeout: 0 }).await.unwrap();
    assert_eq!(list(Default::default()).await, vec![hello.clone()]);

    // Removing the sandbox takes its remaining containers with it.
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb.clone() }).await.unwrap();
    assert!(list(Default::default()).await.is_empty());
}

#[tokio::test]
async fn container_events_stream() {
    let server = Server::start().await.unwrap();
    server.import(tool_module(), "tool").unwrap();
    let mut rt = server.runtime().await;
    let mut events = rt.get_container_events(cri::GetEventsRequest {}).await.unwrap().into_inner();
    let cfg = sandbox_config(&server, "ev");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let c = create(&mut rt, &sb, &cfg, container_config("c", "tool", &["hello"])).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: c.clone() }).await.unwrap();
    wait_exited(&mut rt, &c, WAIT).await.unwrap();
    rt.remove_container(cri::RemoveContainerRequest { container_id: c.clone() }).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let ev = tokio::time::timeout(WAIT, events.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(ev.container_id, c);
        assert_eq!(ev.pod_sandbox_status.as_ref().unwrap().id, sb);
        kinds.push(ev.container_event_type);
    }
    use cri::ContainerEventType as E;
    assert_eq!(
        kinds,
        [E::ContainerCreatedEvent, E::ContainerStartedEvent, E::ContainerStoppedEvent, E::ContainerDeletedEvent]
            .map(|e| e as i32)
    );
}

#[tokio::test]
async fn image_service_bookkeeping() {
    let server = Server::start().await.unwrap();
    let id = server.import(tool_module(), "tool:1").unwrap();
    let id2 = server.import(tool_module(), "registry.example:5000/team/tool:v2").unwrap();
    assert_eq!(id, id2, "same bytes, same image");
    let comp = server.import(tool_component(), "toolc").unwrap();
    let mut img = server.images().await;

    let spec = |s: &str| Some(cri::ImageSpec { image: s.to_string(), ..Default::default() });
    let listed = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(listed.len(), 2);
    let tool = listed.iter().find(|i| i.id == id).unwrap();
    assert_eq!(tool.repo_tags, ["docker.io/library/tool:1", "registry.example:5000/team/tool:v2"]);
    assert_eq!(tool.repo_digests.len(), 2);
    assert!(tool.size > 0);

    // Status by id, short id, tag and digest is the same answer; missing is an empty image.
    let reader = img.clone();
    let by = |s: String| {
        let mut img = reader.clone();
        async move {
            img.image_status(cri::ImageStatusRequest { image: spec(&s), verbose: false })
                .await
                .unwrap()
                .into_inner()
                .image
        }
    };
    let want = by(id.clone()).await.unwrap();
    assert_eq!(want.id, id);
    for name in [id.trim_start_matches("sha256:").to_string(), "tool:1".into(), tool.repo_digests[0].clone()] {
        assert_eq!(by(name.clone()).await.as_ref(), Some(&want), "{name}");
    }
    assert_eq!(by("missing:1".into()).await, None);
    let filtered = img
        .list_images(cri::ListImagesRequest { filter: Some(cri::ImageFilter { image: spec("toolc") }) })
        .await
        .unwrap();
    assert_eq!(filtered.into_inner().images.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), vec![comp.clone()]);

    // PullImage goes to the registry (tests/registry.rs); one nobody serves is an error naming it.
    let e = img
        .pull_image(cri::PullImageRequest { image: spec("127.0.0.1:1/absent:1"), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unknown);
    assert!(e.message().contains("127.0.0.1:1"), "{}", e.message());

    let fs = img.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap().into_inner();
    let usage = &fs.image_filesystems[0];
    assert!(usage.used_bytes.unwrap().value > std::fs::metadata(tool_module()).unwrap().len());
    assert!(usage.inodes_used.unwrap().value >= 4);
    assert!(usage.fs_id.as_ref().unwrap().mountpoint.ends_with("images"));

    // Removing by one tag removes the image with all its tags; again is fine; concurrently too.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut img = img.clone();
        tasks.push(tokio::spawn(async move {
            img.remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec { image: "tool:1".into(), ..Default::default() }),
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(by("registry.example:5000/team/tool:v2".into()).await, None);
    img.remove_image(cri::RemoveImageRequest { image: spec(&id) }).await.unwrap();
    let left = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(left.len(), 1);
}
