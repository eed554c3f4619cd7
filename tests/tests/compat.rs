//! Compat images: ordinary OCI images whose tar layers carry a `.wasm` entrypoint, built here,
//! pushed to a real registry, pulled and run through the CRI.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use wasmlet_tests::images::{gzip, push_image, push_oci, tar_layer};
use wasmlet_tests::*;

#[tokio::test]
async fn compat_image_runs_with_its_config_and_read_only_files() {
    let registry = RegistryServer::start().await.unwrap();
    let tool = std::fs::read(tool_module()).unwrap();
    let base = gzip(&tar_layer(&[
        ("app/tool.wasm", &tool),
        ("etc/motd", b"from the base layer\n"),
        ("data/note", b"hidden later\n"),
    ]));
    let top = tar_layer(&[("etc/greeting", b"hi from the image\n"), ("data/.wh.note", b"")]);
    let reference = format!("{}/compat/tool:1", registry.host);
    let run = json!({
        "Entrypoint": ["/app/tool.wasm"],
        "Cmd": ["cat", "/etc/greeting"],
        "Env": ["FROM_IMAGE=yes", "OVERRIDE=image"],
        "WorkingDir": "/app",
        "User": "1000",
    });
    let config_digest = push_image(&reference, &[(base, true), (top, false)], run).await;

    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let id = pull(&mut img, &reference).await.unwrap();
    assert_eq!(id, config_digest);
    let image = img
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec { image: id.clone(), ..Default::default() }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(image.uid.map(|u| u.value), Some(1000));

    let mut rt = server.runtime().await;
    let cfg = sandbox_config(&server, "compat");
    let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
    let run = |name: &str, args: &[&str], envs: Vec<cri::KeyValue>| {
        let mut c = container_config(name, &reference, args);
        c.command.clear(); // the image's entrypoint
        c.envs = envs;
        let (mut rt, sb, cfg) = (rt.clone(), sb.clone(), cfg.clone());
        async move {
            let id = create(&mut rt, &sb, &cfg, c).await.unwrap();
            rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
            let s = wait_exited(&mut rt, &id, Duration::from_secs(30)).await.unwrap();
            let log = read_log(Path::new(&s.log_path)).unwrap();
            (s.exit_code, texts(&log, "stdout"), texts(&log, "stderr"))
        }
    };
    // No command, no args: the image's entrypoint and cmd.
    assert_eq!(run("default", &[], vec![]).await, (0, vec!["hi from the image".to_string()], vec![]));
    // Args replace the cmd; the base layer's files are there; the whiteout hid data/note.
    assert_eq!(run("motd", &["cat", "/etc/motd"], vec![]).await.1, ["from the base layer"]);
    let (code, _, err) = run("hidden", &["cat", "/data/note"], vec![]).await;
    assert_eq!(code, 1, "{err:?}");
    let (_, out, _) = run("echo", &["echo", "x"], vec![]).await;
    assert_eq!(out, ["argv[0]=/app/tool.wasm", "argv[1]=echo", "argv[2]=x"]);
    let (_, out, _) = run("env", &["env"], vec![cri::KeyValue { key: "OVERRIDE".into(), value: "cri".into() }]).await;
    assert_eq!(out, ["FROM_IMAGE=yes", "OVERRIDE=cri", "HOSTNAME=compat"]);
    // The image's files are read-only to the guest.
    let (code, _, err) = run("write", &["write", "/etc/greeting", "changed"], vec![]).await;
    assert_eq!(code, 1, "{err:?}");
    let _ = rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sb }).await;
}

#[tokio::test]
async fn hostile_or_non_wasm_compat_images_are_refused() {
    let registry = RegistryServer::start().await.unwrap();
    let tool = std::fs::read(tool_module()).unwrap();
    let escape = format!("{}/compat/escape:1", registry.host);
    push_image(&escape, &[(tar_layer(&[("../../evil.wasm", &tool)]), false)], json!({"Entrypoint": ["/evil.wasm"]}))
        .await;
    let shell = format!("{}/compat/shell:1", registry.host);
    push_image(&shell, &[(tar_layer(&[("bin/sh", b"#!")]), false)], json!({"Entrypoint": ["/bin/sh"]})).await;
    let missing = format!("{}/compat/missing:1", registry.host);
    push_image(&missing, &[(tar_layer(&[("app/x", b"x")]), false)], json!({"Entrypoint": ["/app/tool.wasm"]})).await;

    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    for (reference, says) in [
        (&escape, "leaves the root filesystem"),
        (&shell, "not a wasm image"),
        (&missing, "is not in the image's files"),
    ] {
        let e = pull(&mut img, reference).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{reference}: {}", e.message());
        assert!(e.message().contains(reference.as_str()) && e.message().contains(says), "{}", e.message());
    }
    let listed = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert!(listed.is_empty());
    assert!(!server.dir.path().join("evil.wasm").exists());
    let rootfs = server.root().join("images/rootfs");
    let left: Vec<_> = std::fs::read_dir(&rootfs).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing unpacked is left: {left:?}");
}

/// Pushes a one-layer image with the given config and layer media types.
async fn push_layer_image(reference: &str, config_type: &str, config: &[u8], layer_type: &str, layer: &[u8]) {
    push_oci(reference, config_type, config.to_vec(), vec![(layer.to_vec(), layer_type)], json!({})).await;
}

#[tokio::test]
async fn wasm_to_oci_and_bytecode_alliance_layer_images_run() {
    let registry = RegistryServer::start().await.unwrap();
    // wasm-to-oci / Spin era: config v1, one content layer holding a module.
    let spin = format!("{}/formats/spin:1", registry.host);
    let module = std::fs::read(tool_module()).unwrap();
    push_layer_image(
        &spin,
        "application/vnd.wasm.config.v1+json",
        b"{}",
        "application/vnd.wasm.content.layer.v1+wasm",
        &module,
    )
    .await;
    // runwasi's component layer under an ordinary image config.
    let ba = format!("{}/formats/ba:1", registry.host);
    let component = std::fs::read(tool_component()).unwrap();
    let config = br#"{"architecture":"wasm","os":"wasip2","config":{}}"#;
    push_layer_image(
        &ba,
        "application/vnd.oci.image.config.v1+json",
        config,
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
        &component,
    )
    .await;

    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let mut rt = server.runtime().await;
    for (name, reference) in [("spin", &spin), ("ba", &ba)] {
        let id = pull(&mut img, reference).await.unwrap();
        let cfg = sandbox_config(&server, name);
        let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
        let c = create(&mut rt, &sb, &cfg, container_config(name, reference, &["hello"])).await.unwrap();
        rt.start_container(cri::StartContainerRequest { container_id: c.clone() }).await.unwrap();
        let s = wait_exited(&mut rt, &c, Duration::from_secs(30)).await.unwrap();
        assert_eq!((s.exit_code, s.image_id.as_str()), (0, id.as_str()), "{name}");
        assert_eq!(texts(&read_log(Path::new(&s.log_path)).unwrap(), "stdout"), ["hello from wasm"], "{name}");
    }
}
