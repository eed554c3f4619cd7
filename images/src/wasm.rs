use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// What kind of wasm binary an image carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WasmKind {
    /// A core module, run through WASI preview 1.
    Module,
    /// A component, run as a `wasi:cli/command`.
    Component,
}

impl WasmKind {
    /// Reads the 8-byte header: `\0asm`, then version 1 for modules or the component layer.
    pub fn detect(what: &str, bytes: &[u8]) -> Result<WasmKind> {
        let not_wasm = |reason: String| Error::NotWasm { what: what.to_string(), reason };
        if bytes.len() < 8 {
            return Err(not_wasm(format!("{} bytes is shorter than a wasm header", bytes.len())));
        }
        if &bytes[..4] != b"\0asm" {
            return Err(not_wasm(format!("starts with {:02x?}, not the wasm magic", &bytes[..4])));
        }
        if wasmparser::Parser::is_component(bytes) {
            Ok(WasmKind::Component)
        } else if wasmparser::Parser::is_core_wasm(bytes) {
            Ok(WasmKind::Module)
        } else {
            Err(not_wasm(format!("unknown wasm version/layer {:02x?}", &bytes[4..8])))
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_modules_components_and_garbage() {
        let module = wat::parse_str("(module)").unwrap();
        assert_eq!(WasmKind::detect("m", &module).unwrap(), WasmKind::Module);
        let component = wat::parse_str("(component)").unwrap();
        assert_eq!(WasmKind::detect("c", &component).unwrap(), WasmKind::Component);
        let err = WasmKind::detect("x", b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(err.to_string().contains("x: not a wasm module or component"), "{err}");
        assert!(WasmKind::detect("short", b"\0asm").is_err());
    }

    #[test]
    fn digest_format() {
        assert_eq!(sha256_digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
