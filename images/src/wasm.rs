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

/// The names a component imports and exports at its top level (`wasi:cli/run@0.2.0`, ...),
/// for the CNCF wasm config. Empty for a core module or bytes that do not parse.
pub fn component_interfaces(bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    use wasmparser::Payload;
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) if depth > 0 => depth -= 1,
            Payload::ComponentImportSection(r) if depth == 0 => {
                imports.extend(r.into_iter().flatten().map(|i| i.name.name.to_string()));
            }
            Payload::ComponentExportSection(r) if depth == 0 => {
                exports.extend(r.into_iter().flatten().map(|e| e.name.name.to_string()));
            }
            _ => {}
        }
    }
    (imports, exports)
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
    fn component_imports_and_exports() {
        let c = wat::parse_str(
            r#"(component
                 (import "wasi:cli/stdout@0.2.0" (instance))
                 (component $inner (import "hidden" (func)))
                 (core module $m (func (export "f") (result i32) i32.const 1))
                 (core instance $i (instantiate $m))
                 (func $f (result u32) (canon lift (core func $i "f")))
                 (export "run" (func $f)))"#,
        )
        .unwrap();
        let (imports, exports) = component_interfaces(&c);
        assert_eq!(imports, ["wasi:cli/stdout@0.2.0"]);
        assert_eq!(exports, ["run"]);
        assert_eq!(component_interfaces(&wat::parse_str("(module)").unwrap()), (vec![], vec![]));
    }

    #[test]
    fn digest_format() {
        assert_eq!(sha256_digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
