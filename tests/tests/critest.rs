//! critest, the CRI conformance suite of cri-tools (../shared/k8s), against `wasmlet cri`: every
//! `[Conformance]` case but the one that needs an upstream manifest digest.
//!
//! Its images have fixed names under registry.k8s.io and gcr.io. They are the project's own,
//! built from source here (the userland of `workloads/box.c` as a busybox-like image, and
//! `workloads/net.c` run as httpd, serving port 80, as the web server), pushed to a Debian
//! docker-registry on loopback and served to those names through wasmlet's registry mirrors.
//! There is no CNI: pods get their IPs on wasmlet's own bridge (the default as root; a bridge
//! and range of this test's), so critest's requests to pod IPs reach them there and never
//! leave the machine.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use wasmlet_tests::images::{push_image, userland_layer};
use wasmlet_tests::*;

/// The case that pulls an image by the digest of an upstream manifest: no image built here can
/// have that digest.
const SKIPPED: &str = "public image with digest should be pulled and removed";

/// How the images critest asks for are made.
enum Made {
    /// The userland, `sh` by default (busybox's default command).
    Shell,
    /// The web server on port 80 by default (its first log line is its command line, which
    /// critest looks for).
    Web,
    /// The userland with a label of its own, so that it is a different image.
    Distinct(&'static str),
    /// The userland running as this user (critest checks the uid and user name it reports).
    User(&'static str),
}

/// Every image critest's conformance cases pull, by the path a mirror serves (the name without
/// its registry).
const IMAGES: &[(&str, Made)] = &[
    ("e2e-test-images/busybox:1.29-2", Made::Shell),
    ("e2e-test-images/nginx:1.14-2", Made::Web),
    ("e2e-test-images/httpd:2.4.39-4", Made::Web),
    // The same image through two registries (registry.k8s.io and k8s.gcr.io).
    ("pause:3.9", Made::Distinct("pause")),
    ("k8s-staging-cri-tools/test-image-latest:latest", Made::Distinct("latest")),
    ("k8s-staging-cri-tools/test-image-tag:test", Made::Distinct("tag")),
    ("k8s-staging-cri-tools/test-image-tag:all", Made::Distinct("all")),
    ("k8s-staging-cri-tools/test-image-1:latest", Made::Distinct("1")),
    ("k8s-staging-cri-tools/test-image-2:latest", Made::Distinct("2")),
    ("k8s-staging-cri-tools/test-image-3:latest", Made::Distinct("3")),
    ("k8s-staging-cri-tools/test-image-tags:1", Made::Distinct("tags")),
    ("k8s-staging-cri-tools/test-image-tags:2", Made::Distinct("tags")),
    ("k8s-staging-cri-tools/test-image-tags:3", Made::Distinct("tags")),
    ("k8s-staging-cri-tools/test-image-user-uid:latest", Made::User("1002")),
    ("k8s-staging-cri-tools/test-image-user-username:latest", Made::User("www-data")),
    ("k8s-staging-cri-tools/test-image-user-uid-group:latest", Made::User("1003:users")),
    ("k8s-staging-cri-tools/test-image-user-username-group:latest", Made::User("www-data:users")),
    ("k8s-staging-cri-tools/test-image-predefined-group:latest", Made::User("1000:50000")),
];

fn config(made: &Made) -> Value {
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    match made {
        Made::Shell => json!({"Cmd": ["/bin/box.wasm", "sh"], "Env": [format!("PATH={path}")]}),
        Made::Web => json!({"Entrypoint": ["/bin/httpd.wasm", "-D", "FOREGROUND"], "Env": [format!("PATH={path}")]}),
        Made::Distinct(label) => json!({
            "Cmd": ["/bin/box.wasm", "sh"],
            "Env": [format!("PATH={path}")],
            "Labels": {"wasmlet.test/variant": label},
        }),
        Made::User(user) => json!({"Cmd": ["/bin/box.wasm", "sh"], "Env": [format!("PATH={path}")], "User": user}),
    }
}

#[tokio::test]
async fn critest_conformance() {
    if skip_unless_root("critest needs root (pods on a bridge)") {
        return;
    }
    let Some(bin) = wasmlet_tests::cluster::k8s_bin() else {
        assert!(std::env::var_os("CI").is_none(), "critest is missing: scripts/test unpacks it from ../shared/k8s");
        eprintln!("skipped: no critest (unpack ../shared/k8s with `bash ../shared/k8s/install.sh target/k8s`)");
        return;
    };
    let registry = RegistryServer::start().await.unwrap();
    let layer = userland_layer();
    for (path, made) in IMAGES {
        push_image(&format!("{}/{path}", registry.host), &[(layer.clone(), false)], config(made)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let net = TestBridge::new(dir.path(), 'c');
    let config_file = net.config.clone();
    let mut text = std::fs::read_to_string(&config_file).unwrap();
    for upstream in ["registry.k8s.io", "gcr.io", "k8s.gcr.io"] {
        // Mirrors only: a name the mirror lacks must fail, never go to the real registry.
        text.push_str(&format!(
            "\n[registries.\"{upstream}\"]\nmirrors = [\"http://{}\"]\nmirrors_only = true\n",
            registry.host
        ));
    }
    std::fs::write(&config_file, text).unwrap();
    let server = Server::start_with(&["--config", config_file.to_str().unwrap()]).await.unwrap();

    let out = critest(&bin, &server.socket(), dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout.lines().filter(|l| l.starts_with("Ran ") || l.contains(" Passed | ")).collect();
    // The summary line in the test output even when the test passes (past libtest's capture,
    // which only takes print! and eprint!).
    let _ = writeln!(std::io::stderr(), "critest: {}", summary.join(" "));
    assert!(
        out.status.success(),
        "critest failed:\n{stdout}\n{}\nwasmlet's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.server_log()
    );
    assert!(summary.iter().any(|l| l.contains(" 0 Failed")), "{stdout}");
}

/// critest's `[Conformance]` cases (but [`SKIPPED`]) against the CRI socket at `socket`.
fn critest(bin: &Path, socket: &Path, dir: &Path) -> std::process::Output {
    Command::new(bin.join("critest"))
        .arg(format!("--runtime-endpoint=unix://{}", socket.display()))
        .arg(format!("--report-dir={}", dir.display()))
        .arg("--ginkgo.focus=\\[Conformance\\]")
        .arg(format!("--ginkgo.skip={SKIPPED}"))
        .arg("--ginkgo.no-color")
        .current_dir(dir)
        .output()
        .expect("run critest")
}
