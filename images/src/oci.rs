//! OCI manifests, indexes and configs as wasmlet reads them, and which layer of an image is the
//! wasm to run (docs: shared wasm-oci.md's table).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// CNCF wasm artifact config.
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// wasm-to-oci / Spin era config.
pub const WASM_CONFIG_V1: &str = "application/vnd.wasm.config.v1+json";
/// CNCF wasm artifact layer.
pub const WASM_LAYER: &str = "application/wasm";
/// wasm-to-oci / Spin era layer.
pub const WASM_CONTENT_LAYER_V1: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Bytecode Alliance component layer (runwasi).
pub const WASM_COMPONENT_LAYER_V0: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Tar layers of ordinary images.
pub const TAR_LAYERS: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// Every manifest media type a pull accepts.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Media types whose layer bytes are the wasm itself.
pub const WASM_LAYERS: [&str; 3] = [WASM_LAYER, WASM_CONTENT_LAYER_V1, WASM_COMPONENT_LAYER_V0];

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, rename = "os.version", skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest or an index: what a manifest URL answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    /// Image manifests.
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Indexes.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Whether this is an index / manifest list (by its media type, else by shape).
    pub fn is_index(&self) -> bool {
        let t = self.media_type.as_deref().unwrap_or_default();
        t == OCI_INDEX || t == DOCKER_MANIFEST_LIST || (self.config.is_none() && !self.manifests.is_empty())
    }
}

/// The parts of an image config wasmlet uses (OCI and Docker configs, and the CNCF wasm config).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
    /// CNCF wasm config: digests of the layers, in order.
    #[serde(default)]
    pub layer_digests: Vec<String>,
}

/// How an ordinary image says to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// Picks the manifest to pull from an index: a wasm platform first (`wasip2`, then `wasip1`, or
/// any other wasm one), then an ordinary `linux/amd64` entry (a compat image), else the only
/// entry. None when nothing fits.
pub fn choose_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let is = |e: &&Descriptor, os: &str| e.platform.as_ref().is_some_and(|p| p.os == os);
    let wasm_arch = |e: &&Descriptor| e.platform.as_ref().is_some_and(|p| p.architecture == "wasm");
    entries
        .iter()
        .find(|e| is(e, "wasip2"))
        .or_else(|| entries.iter().find(|e| is(e, "wasip1")))
        .or_else(|| entries.iter().find(wasm_arch))
        .or_else(|| {
            entries.iter().find(|e| e.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        })
        .or_else(|| if entries.len() == 1 { entries.first() } else { None })
}

/// Where the wasm of an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasmSource<'a> {
    /// One layer is the wasm binary.
    Layer(&'a Descriptor),
    /// Tar layers make a root filesystem; the config's entrypoint names the wasm in it.
    Compat(Vec<&'a Descriptor>),
}

/// Finds the wasm of an image manifest, or says what the image holds instead.
pub fn wasm_source(manifest: &Manifest) -> Result<WasmSource<'_>, String> {
    let config_type = manifest.config.as_ref().map(|c| c.media_type.as_str()).unwrap_or_default();
    if config_type == WASM_CONFIG_V0 {
        // The CNCF artifact: layer 0 is the entrypoint, whatever else follows.
        return match manifest.layers.first() {
            Some(l) if l.media_type == WASM_LAYER => Ok(WasmSource::Layer(l)),
            Some(l) => Err(format!("wasm artifact whose first layer is {}, not {WASM_LAYER}", l.media_type)),
            None => Err("wasm artifact without layers".to_string()),
        };
    }
    if let Some(l) = manifest.layers.iter().find(|l| WASM_LAYERS.contains(&l.media_type.as_str())) {
        return Ok(WasmSource::Layer(l));
    }
    let tars: Vec<&Descriptor> =
        manifest.layers.iter().filter(|l| TAR_LAYERS.contains(&l.media_type.as_str())).collect();
    if !tars.is_empty() && tars.len() == manifest.layers.len() {
        return Ok(WasmSource::Compat(tars));
    }
    let found: Vec<&str> = manifest.layers.iter().map(|l| l.media_type.as_str()).collect();
    Err(format!("no wasm layer (config {config_type:?}, layers {found:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(media_type: &str, digest: &str) -> Descriptor {
        Descriptor { media_type: media_type.into(), digest: digest.into(), size: 1, platform: None, annotations: None }
    }

    fn p(os: &str, arch: &str, digest: &str) -> Descriptor {
        Descriptor {
            platform: Some(Platform { os: os.into(), architecture: arch.into(), os_version: None, variant: None }),
            ..d(OCI_MANIFEST, digest)
        }
    }

    #[test]
    fn platform_preference() {
        let all = [p("linux", "amd64", "l"), p("wasip1", "wasm", "w1"), p("wasip2", "wasm", "w2")];
        assert_eq!(choose_platform(&all).unwrap().digest, "w2");
        assert_eq!(choose_platform(&all[..2]).unwrap().digest, "w1");
        assert_eq!(choose_platform(&all[..1]).unwrap().digest, "l");
        assert_eq!(choose_platform(&[p("linux", "arm64", "a")]).unwrap().digest, "a");
        assert!(choose_platform(&[p("linux", "arm64", "a"), p("windows", "amd64", "w")]).is_none());
    }

    #[test]
    fn finds_the_wasm_in_every_format() {
        let m = |config: &str, layers: Vec<Descriptor>| Manifest {
            config: Some(d(config, "c")),
            layers,
            ..Default::default()
        };
        let cncf = m(WASM_CONFIG_V0, vec![d(WASM_LAYER, "w"), d(WASM_LAYER, "x")]);
        assert_eq!(wasm_source(&cncf).unwrap(), WasmSource::Layer(&cncf.layers[0]));
        let spin = m(WASM_CONFIG_V1, vec![d(WASM_CONTENT_LAYER_V1, "w")]);
        assert!(matches!(wasm_source(&spin).unwrap(), WasmSource::Layer(l) if l.digest == "w"));
        let ba = m(OCI_CONFIG, vec![d(WASM_COMPONENT_LAYER_V0, "w")]);
        assert!(matches!(wasm_source(&ba).unwrap(), WasmSource::Layer(l) if l.digest == "w"));
        let compat = m(OCI_CONFIG, vec![d(TAR_LAYERS[1], "a"), d(TAR_LAYERS[0], "b")]);
        assert!(matches!(wasm_source(&compat).unwrap(), WasmSource::Compat(ls) if ls.len() == 2));
        let helm = m("application/vnd.cncf.helm.config.v1+json", vec![d("application/tar+gzip", "h")]);
        let err = wasm_source(&helm).unwrap_err();
        assert!(err.contains("no wasm layer") && err.contains("helm"), "{err}");
        let bad = m(WASM_CONFIG_V0, vec![d("text/plain", "t")]);
        assert!(wasm_source(&bad).is_err());
    }

    #[test]
    fn parses_manifests_and_configs() {
        let index: Manifest = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
                "manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":7,
                "platform":{"architecture":"wasm","os":"wasip1"}}]}"#,
        )
        .unwrap();
        assert!(index.is_index());
        assert_eq!(choose_platform(&index.manifests).unwrap().digest, "sha256:a");
        let config: ImageConfig = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/app.wasm"],"Cmd":["--x"],
                "Env":["A=1"],"WorkingDir":"/srv","User":"1000"}}"#,
        )
        .unwrap();
        assert_eq!(config.config.entrypoint.as_deref(), Some(&["/app.wasm".to_string()][..]));
        assert_eq!(config.config.user.as_deref(), Some("1000"));
    }
}
