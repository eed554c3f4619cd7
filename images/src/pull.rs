//! Pulling an image into the store and pushing a wasm file as a CNCF wasm artifact.

use std::collections::BTreeMap;

use serde_json::json;

use crate::oci::{self, ImageConfig, MANIFEST_TYPES, Manifest, WasmSource};
use crate::registry::{MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Registry};
use crate::{Error, ImageRecord, ImageRun, ImageStore, NewImage, Reference, Result, WasmKind, compat, sha256_digest};

/// Largest wasm binary accepted.
pub const MAX_WASM_BYTES: u64 = 512 << 20;
/// Largest tar layer of a compat image accepted.
pub const MAX_LAYER_BYTES: u64 = 1 << 30;

/// Unpacks a compat image's layers into `rootfs/<config hex>` of the store (into a temporary
/// directory first, so a failure leaves nothing) and reads its `.wasm` entrypoint.
fn unpack_compat(
    store: &ImageStore,
    name: &str,
    config_digest: &str,
    config: &ImageConfig,
    layers: &[(Vec<u8>, bool)],
) -> Result<(Vec<u8>, ImageRun)> {
    let bad = |reason: String| Error::BadImage { image: name.to_string(), reason };
    let run = &config.config;
    let entrypoint = run.entrypoint.clone().unwrap_or_default();
    let cmd = run.cmd.clone().unwrap_or_default();
    let program =
        entrypoint.first().or(cmd.first()).ok_or_else(|| bad("image config has no entrypoint or cmd".into()))?;
    if !program.ends_with(".wasm") {
        return Err(bad(format!("entrypoint {program:?} is not a .wasm file: not a wasm image")));
    }
    let rel = format!("rootfs/{}", config_digest.trim_start_matches("sha256:"));
    let dest = store.root().join(&rel);
    let tmp = store.root().join(format!("rootfs/.tmp-{}", rand::random::<u64>()));
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(Error::io(format!("create {}", tmp.display())))?;
        for (bytes, gz) in layers {
            compat::unpack_layer(name, bytes, *gz, &tmp)?;
        }
        let path = compat::resolve_in_root(&tmp, program)
            .ok_or_else(|| bad(format!("entrypoint {program} is not in the image's files")))?;
        let wasm = std::fs::read(&path).map_err(Error::io(format!("read {program}")))?;
        // The same config digest means the same layers: an existing root filesystem (perhaps
        // in use by running containers) is kept as it is.
        if dest.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        } else {
            std::fs::rename(&tmp, &dest).map_err(Error::io(format!("place {}", dest.display())))?;
        }
        Ok(wasm)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let image_run = ImageRun {
        rootfs: rel,
        entrypoint,
        cmd,
        env: run.env.clone().unwrap_or_default(),
        working_dir: run.working_dir.clone().unwrap_or_default(),
    };
    Ok((result?, image_run))
}

/// A manifest, refused when larger than [`MAX_MANIFEST_BYTES`] (whichever registry sent it).
async fn fetch_manifest<R: Registry>(registry: &R, reference: &Reference) -> Result<Vec<u8>> {
    let bytes = registry.manifest(reference, &MANIFEST_TYPES).await?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::TooLarge { what: format!("manifest of {reference}"), limit: MAX_MANIFEST_BYTES as u64 });
    }
    Ok(bytes)
}

/// Pulls `reference` from `registry` into `store`: the manifest (an index is resolved by
/// platform), the config and the wasm layer, each checked against its digest before anything
/// is stored. A reference by digest records no tag. Returns the stored record.
pub async fn pull<R: Registry>(store: &ImageStore, registry: &R, reference: &Reference) -> Result<ImageRecord> {
    let name = reference.to_string();
    let bad = |reason: String| Error::BadImage { image: name.clone(), reason };
    let top = fetch_manifest(registry, reference).await?;
    let top_digest = sha256_digest(&top);
    let mut manifest: Manifest =
        serde_json::from_slice(&top).map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
    let mut blobs_kept = vec![top];
    if manifest.is_index() {
        let entry = oci::choose_platform(&manifest.manifests)
            .ok_or_else(|| {
                let platforms: Vec<String> = manifest
                    .manifests
                    .iter()
                    .map(|m| m.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)).unwrap_or_default())
                    .collect();
                bad(format!("index has no wasm or linux/amd64 manifest (platforms {platforms:?})"))
            })?
            .clone();
        let by_digest = Reference { digest: Some(entry.digest.clone()), ..reference.clone() };
        let bytes = fetch_manifest(registry, &by_digest).await?;
        manifest = serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
        if manifest.is_index() {
            return Err(bad("an index inside an index is not supported".to_string()));
        }
        blobs_kept.push(bytes);
    }
    let config_desc = manifest.config.clone().ok_or_else(|| bad("manifest has no config".to_string()))?;
    let config_bytes = registry.blob(reference, &config_desc.digest, MAX_CONFIG_BYTES).await?;
    // Wasm-era configs are not OCI image configs: read what fits, ignore the rest.
    let config: ImageConfig = serde_json::from_slice(&config_bytes).unwrap_or_default();
    let mut annotations = manifest.annotations.clone();
    let (wasm, run) = match oci::wasm_source(&manifest).map_err(&bad)? {
        WasmSource::Layer(layer) => {
            if let Some(a) = &layer.annotations {
                annotations.extend(a.clone());
            }
            (registry.blob(reference, &layer.digest, MAX_WASM_BYTES).await?, None)
        }
        WasmSource::Compat(layers) => {
            let mut tars = Vec::new();
            for l in layers {
                let gz = l.media_type.ends_with("gzip");
                tars.push((registry.blob(reference, &l.digest, MAX_LAYER_BYTES).await?, gz));
            }
            let (wasm, run) = unpack_compat(store, &name, &config_desc.digest, &config, &tars)?;
            blobs_kept.extend(tars.into_iter().map(|(b, _)| b));
            (wasm, Some(run))
        }
    };
    let kind = WasmKind::detect(&name, &wasm)?;
    blobs_kept.push(config_bytes);
    let mut blobs: Vec<&[u8]> = blobs_kept.iter().map(Vec::as_slice).collect();
    blobs.push(&wasm);
    let record = store.add(NewImage {
        id: config_desc.digest.clone(),
        wasm_digest: sha256_digest(&wasm),
        kind,
        tag: if reference.digest.is_some() { None } else { reference.tagged() },
        repo_digest: Some(reference.with_digest(&top_digest)),
        blobs,
        annotations,
        user: config.config.user.clone(),
        run,
    })?;
    tracing::info!(image = %name, id = %record.id, size = record.size, "pulled image");
    Ok(record)
}

/// Pulls `reference` trying each endpoint in turn (mirrors, then the registry): an endpoint
/// that cannot be reached or does not have the image passes to the next; content that fails
/// its checks stops the pull. The image keeps its canonical name.
pub async fn pull_from(
    store: &ImageStore,
    endpoints: &[crate::Endpoint],
    auth: &crate::Auth,
    reference: &Reference,
) -> Result<ImageRecord> {
    let mut last = None;
    for e in endpoints {
        let registry = crate::OciRegistry::new(&e.host, e.insecure, auth.clone());
        match pull(store, &registry, reference).await {
            Err(err @ Error::Registry { .. }) => {
                tracing::warn!(image = %reference, endpoint = %e.host, error = %err, "endpoint failed; trying the next");
                last = Some(err);
            }
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| Error::Registry { context: format!("pull {reference}"), reason: "no endpoint".into() }))
}

/// Pushes a wasm module or component to `registry` as a CNCF wasm artifact: config
/// `application/vnd.wasm.config.v0+json` (os `wasip1` or `wasip2`, `layerDigests`), one
/// `application/wasm` layer, OCI annotations. Returns the manifest digest.
pub async fn push_wasm<R: Registry>(
    registry: &R,
    reference: &Reference,
    wasm: Vec<u8>,
    annotations: BTreeMap<String, String>,
) -> Result<String> {
    let kind = WasmKind::detect(&reference.to_string(), &wasm)?;
    let wasm_digest = sha256_digest(&wasm);
    let wasm_size = wasm.len();
    let os = match kind {
        WasmKind::Module => "wasip1",
        WasmKind::Component => "wasip2",
    };
    let mut config = json!({
        "created": crate::timefmt::now_rfc3339(),
        "architecture": "wasm",
        "os": os,
        "layerDigests": [wasm_digest],
    });
    if kind == WasmKind::Component {
        let (imports, exports) = crate::wasm::component_interfaces(&wasm);
        config["component"] = json!({ "imports": imports, "exports": exports, "target": null });
    }
    let config = serde_json::to_vec(&config).expect("json");
    let config_digest = sha256_digest(&config);
    let config_size = config.len();
    registry.push_blob(reference, wasm).await?;
    registry.push_blob(reference, config).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "artifactType": oci::WASM_CONFIG_V0,
        "config": { "mediaType": oci::WASM_CONFIG_V0, "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": oci::WASM_LAYER, "digest": wasm_digest, "size": wasm_size }],
        "annotations": annotations,
    });
    let manifest = serde_json::to_vec(&manifest).expect("json");
    registry.push_manifest(reference, manifest, oci::OCI_MANIFEST).await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// A registry in memory: manifests by tag or digest, blobs by digest.
    #[derive(Default)]
    struct Fake {
        manifests: Mutex<HashMap<String, Vec<u8>>>,
        blobs: Mutex<HashMap<String, Vec<u8>>>,
    }

    impl Registry for Fake {
        async fn manifest(&self, r: &Reference, _: &[&str]) -> Result<Vec<u8>> {
            let key = r.digest.clone().or(r.tag.clone()).unwrap_or_default();
            let m = self.manifests.lock().unwrap().get(&key).cloned();
            let m =
                m.ok_or_else(|| Error::Registry { context: format!("pull {r}"), reason: "manifest unknown".into() })?;
            Ok(m)
        }
        async fn blob(&self, r: &Reference, digest: &str, limit: u64) -> Result<Vec<u8>> {
            let b = self.blobs.lock().unwrap().get(digest).cloned();
            let b =
                b.ok_or_else(|| Error::Registry { context: format!("blob of {r}"), reason: "blob unknown".into() })?;
            if b.len() as u64 > limit {
                return Err(Error::TooLarge { what: digest.into(), limit });
            }
            Ok(b)
        }
        async fn push_blob(&self, _: &Reference, bytes: Vec<u8>) -> Result<String> {
            let d = sha256_digest(&bytes);
            self.blobs.lock().unwrap().insert(d.clone(), bytes);
            Ok(d)
        }
        async fn push_manifest(&self, r: &Reference, bytes: Vec<u8>, _: &str) -> Result<String> {
            let d = sha256_digest(&bytes);
            let mut m = self.manifests.lock().unwrap();
            m.insert(r.tag.clone().unwrap_or_default(), bytes.clone());
            m.insert(d.clone(), bytes);
            Ok(d)
        }
    }

    fn module() -> Vec<u8> {
        wat::parse_str("(module)").unwrap()
    }

    #[tokio::test]
    async fn push_then_pull_through_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let fake = Fake::default();
        let r = Reference::parse("example.test/app:1").unwrap();
        let digest = push_wasm(&fake, &r, module(), BTreeMap::new()).await.unwrap();
        // Wrap it in an index next to a linux/arm64 image: the wasm platform is chosen.
        let index = json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [
            {"mediaType": oci::OCI_MANIFEST, "digest": "sha256:0000", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": oci::OCI_MANIFEST, "digest": digest, "size": 1, "platform": {"os": "wasip1", "architecture": "wasm"}},
        ]});
        let ir = Reference::parse("example.test/app:multi").unwrap();
        let index_digest = fake.push_manifest(&ir, serde_json::to_vec(&index).unwrap(), oci::OCI_INDEX).await.unwrap();
        let rec = pull(&store, &fake, &ir).await.unwrap();
        assert_eq!(rec.kind, WasmKind::Module);
        assert_eq!(rec.repo_tags, ["example.test/app:multi"]);
        assert_eq!(rec.repo_digests, [format!("example.test/app@{index_digest}")]);
        assert_eq!(store.read_blob(&rec.wasm_digest).unwrap(), module());
    }

    #[tokio::test]
    async fn a_pushed_component_names_its_interfaces() {
        let fake = Fake::default();
        let r = Reference::parse("example.test/c:1").unwrap();
        let component = wat::parse_str(
            r#"(component (import "wasi:cli/stdout@0.2.0" (instance))
                 (core module $m (func (export "f") (result i32) i32.const 1))
                 (core instance $i (instantiate $m))
                 (func $f (result u32) (canon lift (core func $i "f")))
                 (export "wasi:cli/run@0.2.0#run" (func $f)))"#,
        )
        .unwrap();
        let annotations = BTreeMap::from([("org.opencontainers.image.title".to_string(), "c".to_string())]);
        push_wasm(&fake, &r, component, annotations).await.unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&fake.manifests.lock().unwrap()["1"]).unwrap();
        assert_eq!(manifest["annotations"]["org.opencontainers.image.title"], "c");
        assert_eq!(manifest["layers"][0]["mediaType"], oci::WASM_LAYER);
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
        let config: serde_json::Value = serde_json::from_slice(&fake.blobs.lock().unwrap()[&config_digest]).unwrap();
        assert_eq!(config["os"], "wasip2");
        assert_eq!(config["architecture"], "wasm");
        assert_eq!(config["component"]["imports"], json!(["wasi:cli/stdout@0.2.0"]));
        assert_eq!(config["component"]["exports"], json!(["wasi:cli/run@0.2.0#run"]));
        assert_eq!(config["layerDigests"][0], manifest["layers"][0]["digest"]);
    }

    #[tokio::test]
    async fn refusals_leave_the_store_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let fake = Fake::default();
        let r = |s: &str| Reference::parse(s).unwrap();
        // A manifest larger than the limit.
        fake.manifests.lock().unwrap().insert("huge".into(), vec![b' '; MAX_MANIFEST_BYTES + 1]);
        // A manifest whose config blob the registry does not have.
        let missing = json!({"schemaVersion": 2, "config": {"mediaType": oci::WASM_CONFIG_V0, "digest": "sha256:ab", "size": 2},
            "layers": [{"mediaType": oci::WASM_LAYER, "digest": "sha256:cd", "size": 2}]});
        fake.manifests.lock().unwrap().insert("missing".into(), serde_json::to_vec(&missing).unwrap());
        // An artifact with no wasm (a chart, say).
        let config = fake.push_blob(&r("x/a:1"), b"{}".to_vec()).await.unwrap();
        let chart = json!({"schemaVersion": 2, "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": config, "size": 2}]});
        fake.manifests.lock().unwrap().insert("chart".into(), serde_json::to_vec(&chart).unwrap());
        // Not JSON at all.
        fake.manifests.lock().unwrap().insert("garbage".into(), b"<html>".to_vec());
        // A "wasm" layer that is not wasm.
        push_wasm(&fake, &r("x/a:text"), module(), BTreeMap::new()).await.unwrap();
        let text = fake.push_blob(&r("x/a:1"), b"hello".to_vec()).await.unwrap();
        let m = json!({"schemaVersion": 2, "config": {"mediaType": oci::WASM_CONFIG_V0, "digest": config, "size": 2},
            "layers": [{"mediaType": oci::WASM_LAYER, "digest": text, "size": 5}]});
        fake.manifests.lock().unwrap().insert("text".into(), serde_json::to_vec(&m).unwrap());

        for (tag, says) in [
            ("huge", "larger than the limit"),
            ("missing", "blob unknown"),
            ("chart", "no wasm layer"),
            ("garbage", "not valid JSON"),
            ("text", "not a wasm module or component"),
            ("absent", "manifest unknown"),
        ] {
            let err = pull(&store, &fake, &r(&format!("example.test/x:{tag}"))).await.unwrap_err().to_string();
            assert!(err.contains(says), "{tag}: {err}");
            assert!(err.contains("example.test/x") || err.contains("sha256:"), "{tag}: names the image: {err}");
        }
        assert!(store.list().unwrap().is_empty());
    }
}
