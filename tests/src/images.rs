//! OCI images built by the tests (tar layers, configs, manifests) and pushed to a registry.

use serde_json::json;
use wasmlet_images::registry::Registry;
use wasmlet_images::{Auth, OciRegistry, Reference, sha256_digest};

/// A tar layer holding `files` (path, contents).
pub fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Written raw: a hostile layer may hold names set_path would refuse.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The programs of the conformance userland, each a link to `/bin/box.wasm`.
pub const USERLAND: &[&str] = &["sh", "echo", "sleep", "top", "cat", "ls", "hostname", "pgrep", "true", "false", "env"];

/// A layer with the conformance userland (`workloads/box.c`) as `/bin/box.wasm` and its
/// programs as `/bin/<name>` links to it, as a busybox image has them, and the socket workload
/// (`workloads/net.c`) as `/bin/net.wasm`, run as `/bin/httpd.wasm` a web server on port 80.
pub fn userland_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, file) in [("bin/box.wasm", crate::box_module()), ("bin/net.wasm", crate::net_component())] {
        let wasm = std::fs::read(file).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(wasm.len() as u64);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, wasm.as_slice()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o777);
    h.set_entry_type(tar::EntryType::Symlink);
    b.append_link(&mut h, "bin/httpd.wasm", "net.wasm").unwrap();
    for name in USERLAND {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut h, format!("bin/{name}"), "box.wasm").unwrap();
    }
    b.into_inner().unwrap()
}

/// The bytes gzipped.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

/// Pushes an OCI image manifest with this config and these (bytes, media type) layers; returns
/// the config digest (the image id a pull must answer).
pub async fn push_oci(
    reference: &str,
    config_type: &str,
    config: Vec<u8>,
    layers: Vec<(Vec<u8>, &str)>,
    annotations: serde_json::Value,
) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = Reference::parse(reference).unwrap();
    let registry = OciRegistry::new(&r.registry, true, Auth::Anonymous);
    let mut descriptors = Vec::new();
    for (bytes, media_type) in layers {
        let size = bytes.len();
        let digest = registry.push_blob(&r, bytes).await.unwrap();
        descriptors.push(json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    let config_size = config.len();
    let config_digest = registry.push_blob(&r, config.clone()).await.unwrap();
    assert_eq!(config_digest, sha256_digest(&config));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config_type, "digest": config_digest, "size": config_size},
        "layers": descriptors,
        "annotations": annotations,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    registry.push_manifest(&r, manifest, "application/vnd.oci.image.manifest.v1+json").await.unwrap();
    config_digest
}

/// Pushes a compat image: tar layers (gzipped or not) and an OCI config with `run`.
pub async fn push_image(reference: &str, layers: &[(Vec<u8>, bool)], run: serde_json::Value) -> String {
    let layers = layers
        .iter()
        .map(|(bytes, gz)| {
            let t = if *gz {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            (bytes.clone(), t)
        })
        .collect();
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": run})).unwrap();
    let compat = json!({"module.wasm.image/variant": "compat"});
    push_oci(reference, "application/vnd.oci.image.config.v1+json", config, layers, compat).await
}
