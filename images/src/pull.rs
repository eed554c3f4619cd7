//! Pulling an image into the store and pushing a wasm file as a CNCF wasm artifact.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use serde_json::json;

use crate::oci::{self, Descriptor, ImageConfig, MANIFEST_TYPES, Manifest, WasmSource};
use crate::registry::{MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Registry};
use crate::{
    BlobSource, Error, ImageRecord, ImageRun, ImageStore, Ingest, NewImage, Observer, Progress, Reference, Result,
    StagedBlob, WasmKind, compat, sha256_digest,
};

/// Largest wasm binary accepted.
pub const MAX_WASM_BYTES: u64 = 512 << 20;
/// Largest tar layer of a compat image accepted.
pub const MAX_LAYER_BYTES: u64 = 1 << 30;

/// A blob of the image being pulled: one the store already has, or one just downloaded.
enum Fetched {
    Stored(String),
    Staged(StagedBlob),
}

impl Fetched {
    fn source(&self) -> BlobSource<'_> {
        match self {
            Fetched::Stored(d) => BlobSource::Stored(d.clone()),
            Fetched::Staged(s) => BlobSource::Staged(s),
        }
    }

    /// Its bytes; a stored blob is checked against its digest again, never trusted.
    fn read(&self, store: &ImageStore) -> Result<Vec<u8>> {
        match self {
            Fetched::Stored(d) => store.read_blob(d),
            Fetched::Staged(s) => s.read(),
        }
    }

    /// A reader of its bytes (a stored blob is checked first, by streaming it).
    fn open(&self, store: &ImageStore) -> Result<File> {
        let path = match self {
            Fetched::Stored(d) => {
                store.verify_blob(d)?;
                store.blob_path(d)
            }
            Fetched::Staged(s) => s.path.clone(),
        };
        File::open(&path).map_err(Error::io(format!("open {}", path.display())))
    }
}

/// Fetches the blob `desc` describes, unless the store has it: streamed into `ingest`, at most
/// `limit` bytes, checked against its digest and its declared size.
async fn fetch<R: Registry>(
    store: &ImageStore,
    registry: &R,
    ingest: &Ingest,
    reference: &Reference,
    what: &str,
    desc: &Descriptor,
    limit: u64,
) -> Result<Fetched> {
    let declared = u64::try_from(desc.size).map_err(|_| Error::BadImage {
        image: reference.to_string(),
        reason: format!("{what} {} has a negative size", desc.digest),
    })?;
    if declared > limit {
        return Err(Error::TooLarge { what: format!("{what} {} of {reference}", desc.digest), limit });
    }
    if store.has_blob(&desc.digest) {
        ingest.skipped(what, &desc.digest, declared);
        return Ok(Fetched::Stored(desc.digest.clone()));
    }
    let mut out = ingest.writer(what, &desc.digest, Some(declared), limit)?;
    registry.blob(reference, &desc.digest, &mut out).await?;
    let staged = out.finish()?;
    if staged.size != declared {
        return Err(Error::BadImage {
            image: reference.to_string(),
            reason: format!("{what} {} is {} bytes but the manifest says {declared}", desc.digest, staged.size),
        });
    }
    Ok(Fetched::Staged(staged))
}

/// Unpacks a compat image's layers into `rootfs/<config hex>` of the store (into a temporary
/// directory first, so a failure leaves nothing) and reads its `.wasm` entrypoint. A root
/// filesystem already there (the same config digest means the same layers, perhaps in use by
/// running containers) is kept as it is.
fn unpack_compat(
    store: &ImageStore,
    name: &str,
    config_digest: &str,
    config: &ImageConfig,
    layers: &[(Fetched, bool)],
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
    let read_program = |root: &Path| {
        let path = compat::resolve_in_root(root, program)
            .ok_or_else(|| bad(format!("entrypoint {program} is not in the image's files")))?;
        std::fs::read(&path).map_err(Error::io(format!("read {program}")))
    };
    let wasm = if dest.exists() {
        read_program(&dest)?
    } else {
        let tmp = store.root().join(format!("rootfs/.tmp-{}", rand::random::<u64>()));
        let result = (|| {
            std::fs::create_dir_all(&tmp).map_err(Error::io(format!("create {}", tmp.display())))?;
            for (layer, gz) in layers {
                compat::unpack_layer(name, std::io::BufReader::new(layer.open(store)?), *gz, &tmp)?;
            }
            let wasm = read_program(&tmp)?;
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
        result?
    };
    let image_run = ImageRun {
        rootfs: rel,
        entrypoint,
        cmd,
        env: run.env.clone().unwrap_or_default(),
        working_dir: run.working_dir.clone().unwrap_or_default(),
    };
    Ok((wasm, image_run))
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
/// is stored; blobs the store has are not downloaded again. A reference by digest records no
/// tag. `observer` hears how each blob is getting on. Returns the stored record.
pub async fn pull<R: Registry>(
    store: &ImageStore,
    registry: &R,
    reference: &Reference,
    observer: Option<Observer>,
) -> Result<ImageRecord> {
    let name = reference.to_string();
    let bad = |reason: String| Error::BadImage { image: name.clone(), reason };
    let top = fetch_manifest(registry, reference).await?;
    let top_digest = sha256_digest(&top);
    let mut manifest: Manifest =
        serde_json::from_slice(&top).map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
    let mut manifests = vec![top];
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
        manifests.push(bytes);
    }
    let ingest = store.ingest(observer)?;
    let config_desc = manifest.config.clone().ok_or_else(|| bad("manifest has no config".to_string()))?;
    let config_blob = fetch(store, registry, &ingest, reference, "config", &config_desc, MAX_CONFIG_BYTES).await?;
    // Wasm-era configs are not OCI image configs: read what fits, ignore the rest.
    let config: ImageConfig = serde_json::from_slice(&config_blob.read(store)?).unwrap_or_default();
    let mut annotations = manifest.annotations.clone();
    let mut layers = Vec::new();
    let (wasm, wasm_blob, run) = match oci::wasm_source(&manifest).map_err(&bad)? {
        WasmSource::Layer(layer) => {
            if let Some(a) = &layer.annotations {
                annotations.extend(a.clone());
            }
            let blob = fetch(store, registry, &ingest, reference, "wasm", layer, MAX_WASM_BYTES).await?;
            (blob.read(store)?, Some(blob), None)
        }
        WasmSource::Compat(tars) => {
            for l in tars {
                let gz = l.media_type.ends_with("gzip");
                layers.push((fetch(store, registry, &ingest, reference, "layer", l, MAX_LAYER_BYTES).await?, gz));
            }
            let (wasm, run) = unpack_compat(store, &name, &config_desc.digest, &config, &layers)?;
            (wasm, None, Some(run))
        }
    };
    let kind = WasmKind::detect(&name, &wasm)?;
    let mut blobs: Vec<BlobSource> = manifests.iter().map(|m| BlobSource::Bytes(m)).collect();
    blobs.push(config_blob.source());
    blobs.extend(layers.iter().map(|(l, _)| l.source()));
    blobs.push(match &wasm_blob {
        Some(b) => b.source(),
        None => BlobSource::Bytes(&wasm),
    });
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
    observer: Option<Observer>,
) -> Result<ImageRecord> {
    let mut last = None;
    for e in endpoints {
        let registry = crate::OciRegistry::new(&e.host, e.insecure, auth.clone());
        match pull(store, &registry, reference, observer.clone()).await {
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
    observer: Option<Observer>,
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
    let report = |what: &str, digest: &str, size: usize, finished: bool| {
        if let Some(o) = &observer {
            let size = size as u64;
            let done = if finished { size } else { 0 };
            o(Progress { what, digest, done, total: Some(size), finished, skipped: false });
        }
    };
    report("wasm", &wasm_digest, wasm_size, false);
    registry.push_blob(reference, wasm).await?;
    report("wasm", &wasm_digest, wasm_size, true);
    report("config", &config_digest, config_size, false);
    registry.push_blob(reference, config).await?;
    report("config", &config_digest, config_size, true);
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
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::BlobWriter;

    /// A registry in memory: manifests by tag or digest, blobs by digest.
    #[derive(Default)]
    struct Fake {
        manifests: Mutex<HashMap<String, Vec<u8>>>,
        blobs: Mutex<HashMap<String, Vec<u8>>>,
        /// Blob downloads asked for, by digest.
        fetched: Mutex<Vec<String>>,
        /// A blob whose download sends half and then never ends.
        stall: Mutex<Option<String>>,
    }

    impl Registry for Fake {
        async fn manifest(&self, r: &Reference, _: &[&str]) -> Result<Vec<u8>> {
            let key = r.digest.clone().or(r.tag.clone()).unwrap_or_default();
            let m = self.manifests.lock().unwrap().get(&key).cloned();
            let m =
                m.ok_or_else(|| Error::Registry { context: format!("pull {r}"), reason: "manifest unknown".into() })?;
            Ok(m)
        }
        async fn blob(&self, r: &Reference, digest: &str, out: &mut BlobWriter) -> Result<()> {
            let b = self.blobs.lock().unwrap().get(digest).cloned();
            let b =
                b.ok_or_else(|| Error::Registry { context: format!("blob of {r}"), reason: "blob unknown".into() })?;
            self.fetched.lock().unwrap().push(digest.to_string());
            if self.stall.lock().unwrap().as_deref() == Some(digest) {
                out.write(&b[..b.len() / 2])?;
                std::future::pending::<()>().await;
            }
            // In chunks, as a registry sends them.
            b.chunks(7).try_for_each(|c| out.write(c))
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
        let digest = push_wasm(&fake, &r, module(), BTreeMap::new(), None).await.unwrap();
        // Wrap it in an index next to a linux/arm64 image: the wasm platform is chosen.
        let index = json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [
            {"mediaType": oci::OCI_MANIFEST, "digest": "sha256:0000", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": oci::OCI_MANIFEST, "digest": digest, "size": 1, "platform": {"os": "wasip1", "architecture": "wasm"}},
        ]});
        let ir = Reference::parse("example.test/app:multi").unwrap();
        let index_digest = fake.push_manifest(&ir, serde_json::to_vec(&index).unwrap(), oci::OCI_INDEX).await.unwrap();
        let rec = pull(&store, &fake, &ir, None).await.unwrap();
        assert_eq!(rec.kind, WasmKind::Module);
        assert_eq!(rec.repo_tags, ["example.test/app:multi"]);
        assert_eq!(rec.repo_digests, [format!("example.test/app@{index_digest}")]);
        assert_eq!(store.read_blob(&rec.wasm_digest).unwrap(), module());
    }

    #[tokio::test]
    async fn blobs_the_store_has_are_not_downloaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let fake = Fake::default();
        let r = Reference::parse("example.test/app:1").unwrap();
        push_wasm(&fake, &r, module(), BTreeMap::new(), None).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer: Observer = Arc::new(move |p| {
            if p.finished {
                log.lock().unwrap().push((p.what.to_string(), p.skipped, p.done));
            }
        });
        pull(&store, &fake, &r, Some(observer.clone())).await.unwrap();
        assert_eq!(fake.fetched.lock().unwrap().len(), 2, "config and wasm");
        let wasm_len = module().len() as u64;
        assert!(seen.lock().unwrap().contains(&("wasm".to_string(), false, wasm_len)));
        // Again, and by digest: the manifest is read, no blob moves.
        pull(&store, &fake, &r, Some(observer)).await.unwrap();
        assert_eq!(fake.fetched.lock().unwrap().len(), 2);
        assert!(seen.lock().unwrap().contains(&("wasm".to_string(), true, wasm_len)));
        // A stored blob that was corrupted is not trusted: the pull says so.
        let rec = store.resolve("example.test/app:1").unwrap().unwrap();
        std::fs::write(store.blob_path(&rec.wasm_digest), b"\0asm junk").unwrap();
        let err = pull(&store, &fake, &r, None).await.unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
    }

    #[tokio::test]
    async fn a_cancelled_or_lying_download_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let fake = Fake::default();
        let r = Reference::parse("example.test/app:1").unwrap();
        push_wasm(&fake, &r, module(), BTreeMap::new(), None).await.unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&fake.manifests.lock().unwrap()["1"]).unwrap();
        let wasm_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
        *fake.stall.lock().unwrap() = Some(wasm_digest.clone());
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(50), pull(&store, &fake, &r, None)).await;
        assert!(cancelled.is_err(), "the stalled pull cannot finish");
        let ingest = dir.path().join("ingest");
        assert_eq!(std::fs::read_dir(&ingest).unwrap().count(), 0, "the partial download is gone");
        assert!(!store.has_blob(&wasm_digest));
        assert!(store.list().unwrap().is_empty());
        // A manifest that says the layer is smaller than it is.
        *fake.stall.lock().unwrap() = None;
        let mut lying = manifest.clone();
        lying["layers"][0]["size"] = json!(3);
        let lr = Reference::parse("example.test/app:lying").unwrap();
        fake.push_manifest(&lr, serde_json::to_vec(&lying).unwrap(), oci::OCI_MANIFEST).await.unwrap();
        let err = pull(&store, &fake, &lr, None).await.unwrap_err().to_string();
        assert!(err.contains("but the manifest says 3"), "{err}");
        // One that declares more than the limit is refused before any byte moves.
        let mut huge = manifest;
        huge["layers"][0]["size"] = json!(MAX_WASM_BYTES + 1);
        let hr = Reference::parse("example.test/app:huge").unwrap();
        fake.push_manifest(&hr, serde_json::to_vec(&huge).unwrap(), oci::OCI_MANIFEST).await.unwrap();
        let before = fake.fetched.lock().unwrap().len();
        let err = pull(&store, &fake, &hr, None).await.unwrap_err().to_string();
        assert!(err.contains("larger than the limit"), "{err}");
        assert_eq!(fake.fetched.lock().unwrap().len(), before + 1, "only the config was fetched");
        assert!(store.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&ingest).unwrap().count(), 0);
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
        push_wasm(&fake, &r, component, annotations, None).await.unwrap();
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
        let missing = json!({"schemaVersion": 2, "config": {"mediaType": oci::WASM_CONFIG_V0, "digest": sha256_digest(b"ab"), "size": 2},
            "layers": [{"mediaType": oci::WASM_LAYER, "digest": sha256_digest(b"cd"), "size": 2}]});
        fake.manifests.lock().unwrap().insert("missing".into(), serde_json::to_vec(&missing).unwrap());
        // An artifact with no wasm (a chart, say).
        let config = fake.push_blob(&r("x/a:1"), b"{}".to_vec()).await.unwrap();
        let chart = json!({"schemaVersion": 2, "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": config, "size": 2}]});
        fake.manifests.lock().unwrap().insert("chart".into(), serde_json::to_vec(&chart).unwrap());
        // Not JSON at all.
        fake.manifests.lock().unwrap().insert("garbage".into(), b"<html>".to_vec());
        // A "wasm" layer that is not wasm.
        push_wasm(&fake, &r("x/a:text"), module(), BTreeMap::new(), None).await.unwrap();
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
            let err = pull(&store, &fake, &r(&format!("example.test/x:{tag}")), None).await.unwrap_err().to_string();
            assert!(err.contains(says), "{tag}: {err}");
            assert!(err.contains("example.test/x") || err.contains("sha256:"), "{tag}: names the image: {err}");
        }
        assert!(store.list().unwrap().is_empty());
    }
}
