//! Pulling an image into the store and pushing a wasm file as a CNCF wasm artifact.

use std::collections::BTreeMap;

use serde_json::json;

use crate::oci::{self, ImageConfig, MANIFEST_TYPES, Manifest, WasmSource};
use crate::registry::{MAX_CONFIG_BYTES, Registry};
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

/// Pulls `reference` from `registry` into `store`: the manifest (an index is resolved by
/// platform), the config and the wasm layer, each checked against its digest before anything
/// is stored. A reference by digest records no tag. Returns the stored record.
pub async fn pull<R: Registry>(store: &ImageStore, registry: &R, reference: &Reference) -> Result<ImageRecord> {
    let name = reference.to_string();
    let bad = |reason: String| Error::BadImage { image: name.clone(), reason };
    let (top, media_type) = registry.manifest(reference, &MANIFEST_TYPES).await?;
    let top_digest = sha256_digest(&top);
    let mut manifest: Manifest =
        serde_json::from_slice(&top).map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
    let mut manifest_bytes = top.clone();
    let mut blobs_kept = vec![top];
    if manifest.is_index(&media_type) {
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
        let (bytes, media_type) = registry.manifest(&by_digest, &MANIFEST_TYPES).await?;
        manifest = serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
        if manifest.is_index(&media_type) {
            return Err(bad("an index inside an index is not supported".to_string()));
        }
        manifest_bytes = bytes.clone();
        blobs_kept.push(bytes);
    }
    let _ = manifest_bytes;
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
    let config = json!({
        "created": crate::timefmt::now_rfc3339(),
        "architecture": "wasm",
        "os": os,
        "layerDigests": [wasm_digest],
    });
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
