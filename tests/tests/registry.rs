//! Pulls from a real registry (Debian's docker-registry on loopback) through the CRI.

use std::time::Duration;

use tonic::Code;
use wasmlet_tests::*;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec { image: image.to_string(), ..Default::default() })
}

#[tokio::test]
async fn push_then_pull_by_tag_and_digest_and_run() {
    let registry = RegistryServer::start().await.unwrap();
    let module_ref = format!("{}/wasm/tool:1.0", registry.host);
    let component_ref = format!("{}/wasm/toolc:2.0", registry.host);
    let module_digest = push(tool_module(), &module_ref).unwrap();
    push(tool_component(), &component_ref).unwrap();
    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let mut rt = server.runtime().await;

    let id = pull(&mut img, &module_ref).await.unwrap();
    let status = img.image_status(cri::ImageStatusRequest { image: spec(&module_ref), verbose: false }).await.unwrap();
    let image = status.into_inner().image.unwrap();
    assert_eq!(image.id, id, "PullImageResponse.image_ref is Image.id");
    assert_eq!(image.repo_tags, vec![module_ref.clone()]);
    let by_digest = format!("{}/wasm/tool@{module_digest}", registry.host);
    assert_eq!(image.repo_digests, vec![by_digest.clone()]);
    assert!(image.size > std::fs::metadata(tool_module()).unwrap().len());

    // Pulling again (a kubelet with policy Always) is the same image; by digest too.
    assert_eq!(pull(&mut img, &module_ref).await.unwrap(), id);
    assert_eq!(pull(&mut img, &by_digest).await.unwrap(), id);
    let comp_id = pull(&mut img, &component_ref).await.unwrap();
    assert_ne!(comp_id, id);

    for (name, image) in [("m", &module_ref), ("c", &component_ref)] {
        let cfg = sandbox_config(&server, name);
        let sb = run_sandbox(&mut rt, &cfg).await.unwrap();
        let c = create(&mut rt, &sb, &cfg, container_config(name, image, &["hello"])).await.unwrap();
        rt.start_container(cri::StartContainerRequest { container_id: c.clone() }).await.unwrap();
        let s = wait_exited(&mut rt, &c, Duration::from_secs(30)).await.unwrap();
        assert_eq!(s.exit_code, 0);
        assert_eq!(s.image_id, if name == "m" { id.clone() } else { comp_id.clone() });
        assert_eq!(texts(&read_log(std::path::Path::new(&s.log_path)).unwrap(), "stdout"), ["hello from wasm"]);
    }
    // Compiled at pull time: starting the containers compiled nothing more.
    assert_eq!(server.server_log().matches("compiled wasm").count(), 2);
}

#[tokio::test]
async fn pull_by_digest_records_no_tag_and_concurrent_pulls_agree() {
    let registry = RegistryServer::start().await.unwrap();
    let tagged = format!("{}/wasm/tool:1.0", registry.host);
    let digest = push(tool_module(), &tagged).unwrap();
    let server = Server::start().await.unwrap();
    let img = server.images().await;
    let by_digest = format!("{}/wasm/tool@{digest}", registry.host);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut img = img.clone();
        let r = by_digest.clone();
        tasks.push(tokio::spawn(async move { pull(&mut img, &r).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // One download of the wasm for all of them, and none for a pull after they are done.
    assert_eq!(pull(&mut img.clone(), &by_digest).await.unwrap(), ids[0]);
    let wasm_digest = wasmlet_images::sha256_digest(&std::fs::read(tool_module()).unwrap());
    assert_eq!(registry.blob_downloads(&wasm_digest), 1, "{}", registry.log());
    let mut img = img.clone();
    let listed = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].repo_tags.is_empty(), "pull by digest records no tag: {:?}", listed[0].repo_tags);
    assert_eq!(listed[0].repo_digests, [by_digest]);
}

#[tokio::test]
async fn bad_pulls_leave_the_store_unchanged() {
    let registry = RegistryServer::start().await.unwrap();
    let good = format!("{}/wasm/tool:1", registry.host);
    push(tool_module(), &good).unwrap();
    let corrupt = format!("{}/wasm/other:1", registry.host);
    push(tool_component(), &corrupt).unwrap();
    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let id = pull(&mut img, &good).await.unwrap();
    let before = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;

    // A tag the registry does not have: the error names the registry.
    let e = pull(&mut img, &format!("{}/wasm/tool:missing", registry.host)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unknown);
    assert!(e.message().contains(&registry.host), "{}", e.message());

    // A blob whose bytes no longer match its digest (corrupted in the registry's storage).
    let component = std::fs::read(tool_component()).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&component));
    std::fs::write(registry.blob_path(&digest), b"tampered").unwrap();
    let e = pull(&mut img, &corrupt).await.unwrap_err();
    assert!(e.code() == Code::DataLoss || e.message().contains("digest"), "{:?}: {}", e.code(), e.message());

    // A registry nobody listens on.
    let e = pull(&mut img, "127.0.0.1:1/nothing:1").await.unwrap_err();
    assert!(e.message().contains("127.0.0.1:1"), "{}", e.message());

    let after = img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(after, before);
    assert_eq!(after[0].id, id);
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = output_with_input(&mut std::process::Command::new("sha256sum"), bytes).unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn registry_auth_from_the_cri_auth_config() {
    let registry = RegistryServer::start_with_htpasswd("alice", "s3cret").await.unwrap();
    let reference = format!("{}/private/tool:1", registry.host);
    let out = push_as(tool_module(), &reference, "alice", "s3cret");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let with =
        |auth: Option<cri::AuthConfig>| cri::PullImageRequest { image: spec(&reference), auth, ..Default::default() };

    for (what, auth) in [
        ("no credentials", None),
        (
            "a wrong password",
            Some(cri::AuthConfig { username: "alice".into(), password: "nope".into(), ..Default::default() }),
        ),
    ] {
        let e = img.pull_image(with(auth)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unknown, "{what}");
        assert!(e.message().contains(&registry.host) && e.message().contains("authoriz"), "{what}: {}", e.message());
    }
    assert!(img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images.is_empty());

    let basic = cri::AuthConfig { username: "alice".into(), password: "s3cret".into(), ..Default::default() };
    let id = img.pull_image(with(Some(basic))).await.unwrap().into_inner().image_ref;
    // The docker config form: base64 of user:password.
    let encoded = cri::AuthConfig { auth: "YWxpY2U6czNjcmV0".into(), ..Default::default() };
    assert_eq!(img.pull_image(with(Some(encoded))).await.unwrap().into_inner().image_ref, id);
}

#[tokio::test]
async fn bearer_token_flow_from_the_cri_auth_config() {
    let registry = RegistryServer::start_with_token("bob", "t0ken").await.unwrap();
    let token = registry.token.as_ref().unwrap();
    let reference = format!("{}/private/tool:1", registry.host);
    let push = |password: &str| push_as(tool_module(), &reference, "bob", password);
    let refused = push("wrong");
    assert!(!refused.status.success());
    let says = String::from_utf8_lossy(&refused.stderr);
    assert!(says.contains(&registry.host), "names the registry: {says}");
    let out = push("t0ken");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let issued_for_push = token.issued.load(std::sync::atomic::Ordering::SeqCst);
    assert!(issued_for_push > 0, "the push went through the token server");

    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let with =
        |auth: Option<cri::AuthConfig>| cri::PullImageRequest { image: spec(&reference), auth, ..Default::default() };
    let user =
        |password: &str| cri::AuthConfig { username: "bob".into(), password: password.into(), ..Default::default() };
    let bearer = |t: String| cri::AuthConfig { registry_token: t, ..Default::default() };
    for (what, auth) in [
        ("no credentials", None),
        ("a wrong password", Some(user("nope"))),
        ("a token for another repository", Some(bearer(token.mint("other/repo", &["pull"])))),
        ("a token that is not one", Some(bearer("not-a-jwt".into()))),
    ] {
        let e = img.pull_image(with(auth)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unknown, "{what}");
        assert!(e.message().contains(&registry.host), "{what}: names the registry: {}", e.message());
    }
    assert!(img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images.is_empty());
    assert!(token.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2, "bad credentials reached the token server");

    // User and password: wasmlet asks the token server, then presents the token.
    let id = img.pull_image(with(Some(user("t0ken")))).await.unwrap().into_inner().image_ref;
    assert!(token.issued.load(std::sync::atomic::Ordering::SeqCst) > issued_for_push);
    // A token the client already holds (AuthConfig.registry_token) is presented as it is.
    let held = bearer(token.mint("private/tool", &["pull"]));
    assert_eq!(img.pull_image(with(Some(held))).await.unwrap().into_inner().image_ref, id);
}

#[tokio::test]
async fn a_mirror_serves_a_registry_under_its_canonical_name() {
    let mirror = RegistryServer::start().await.unwrap();
    push(tool_module(), &format!("{}/wasm/tool:1", mirror.host)).unwrap();
    let config = mirror.dir.path().join("wasmlet.toml");
    // The canonical registry does not exist at all: only the mirror can answer.
    std::fs::write(
        &config,
        format!("[registries.\"registry.invalid\"]\nmirrors = [\"http://127.0.0.1:1\", \"http://{}\"]\n", mirror.host),
    )
    .unwrap();
    let server = Server::start_with(&["--config", config.to_str().unwrap()]).await.unwrap();
    let mut img = server.images().await;
    let id = pull(&mut img, "registry.invalid/wasm/tool:1").await.unwrap();
    let image = img
        .image_status(cri::ImageStatusRequest { image: spec("registry.invalid/wasm/tool:1"), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(image.id, id);
    assert_eq!(image.repo_tags, ["registry.invalid/wasm/tool:1"]);
    assert!(image.repo_digests[0].starts_with("registry.invalid/wasm/tool@sha256:"));

    // A typo in the config file is refused with the file named, before anything serves.
    let bad = mirror.dir.path().join("bad.toml");
    std::fs::write(&bad, "[registries.\"x\"]\nmirror = []\n").unwrap();
    let out = std::process::Command::new(wasmlet_bin())
        .args(["cri", "--config", bad.to_str().unwrap(), "--root"])
        .arg(mirror.dir.path().join("r"))
        .arg("--socket")
        .arg(mirror.dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("mirror"), "{err}");
}

#[tokio::test]
async fn truncated_wasm_and_deadlines() {
    let registry = RegistryServer::start().await.unwrap();
    let mut truncated = std::fs::read(tool_module()).unwrap();
    truncated.truncate(truncated.len() / 2);
    let file = registry.dir.path().join("truncated.wasm");
    std::fs::write(&file, &truncated).unwrap();
    let reference = format!("{}/wasm/truncated:1", registry.host);
    push(&file, &reference).unwrap();
    let server = Server::start().await.unwrap();
    let mut img = server.images().await;
    let e = pull(&mut img, &reference).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&reference) && e.message().contains("invalid wasm"), "{}", e.message());

    // A registry that accepts connections and never answers: the client's deadline holds.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let keep = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            open.push(s);
        }
    });
    let mut req = tonic::Request::new(cri::PullImageRequest {
        image: spec(&format!("{hole_addr}/slow:1")),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(1));
    // Without the deadline this call would never return.
    let e = img.pull_image(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(e.message().contains("slow:1"), "{}", e.message());
    keep.abort();

    assert!(img.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images.is_empty());
    let mut rt = server.runtime().await;
    rt.version(cri::VersionRequest { version: "0.1.0".into() }).await.unwrap();
}
