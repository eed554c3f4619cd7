//! The compiled-code cache: wasm is compiled once per (wasm digest, engine fingerprint), the
//! machine code is kept on disk and memory-mapped on load, so a restart does not recompile.

// Loading precompiled code is `unsafe` in wasmtime because the bytes are trusted to be machine
// code that wasmtime itself produced. This module is the only place that does it, and only for
// files it wrote itself, in wasmlet's own state directory: each is written atomically (never
// modified in place, so the mapping cannot change under us) next to a CRC-32 and length of its
// contents, checked before loading. That catches torn and corrupted files (the failure to guard
// against: whoever can write this directory can write anything of wasmlet's); a cryptographic
// hash of a 20 MB entry cost 28 ms per load here, the CRC about 2.
#![allow(unsafe_code)]

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::{Error, Result, WasmKind, fsutil};

/// A compiled module or component, ready to be linked.
#[derive(Clone)]
pub enum CompiledProgram {
    /// A core module.
    Module(Module),
    /// A component.
    Component(Component),
}

/// The on-disk cache of compiled code for one engine configuration.
pub struct CompiledCache {
    dir: PathBuf,
    fingerprint: String,
}

impl CompiledCache {
    /// A cache in `dir` for code compiled by `engine`.
    pub fn new(dir: impl Into<PathBuf>, engine: &Engine) -> Result<CompiledCache> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Ok(CompiledCache { dir, fingerprint: format!("{:016x}", h.finish()) })
    }

    fn entry(&self, wasm_digest: &str) -> PathBuf {
        let hex = wasm_digest.strip_prefix("sha256:").unwrap_or(wasm_digest);
        self.dir.join(format!("{hex}-{}.cwasm", self.fingerprint))
    }

    /// Whether compiled code for `wasm_digest` is on disk (it may still prove stale on load).
    pub fn contains(&self, wasm_digest: &str) -> bool {
        self.entry(wasm_digest).exists()
    }

    /// Loads the compiled code for `wasm_digest`, compiling `wasm()` and storing the result
    /// when there is no usable entry. `what` names the image in errors.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        what: &str,
        wasm_digest: &str,
        kind: WasmKind,
        wasm: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<CompiledProgram> {
        let path = self.entry(wasm_digest);
        if path.exists() {
            let started = std::time::Instant::now();
            match self.load(engine, &path, kind) {
                Ok(p) => {
                    tracing::debug!(%what, %wasm_digest, elapsed_us = started.elapsed().as_micros() as u64, "loaded compiled code");
                    return Ok(p);
                }
                Err(reason) => {
                    tracing::warn!(entry = %path.display(), %reason, "compiled-code cache entry unusable; recompiling");
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(sum_path(&path));
                }
            }
        }
        let bytes = wasm()?;
        let invalid = |e: wasmtime::Error| Error::InvalidWasm { what: what.to_string(), reason: format!("{e:#}") };
        let started = std::time::Instant::now();
        let (program, serialized) = match kind {
            WasmKind::Module => {
                let m = Module::new(engine, &bytes).map_err(invalid)?;
                let s = m.serialize().map_err(invalid)?;
                (CompiledProgram::Module(m), s)
            }
            WasmKind::Component => {
                let c = Component::new(engine, &bytes).map_err(invalid)?;
                let s = c.serialize().map_err(invalid)?;
                (CompiledProgram::Component(c), s)
            }
        };
        tracing::info!(%what, %wasm_digest, elapsed_ms = started.elapsed().as_millis() as u64, "compiled wasm");
        // The sum goes first: an entry without a matching sum is never loaded.
        let stored = fsutil::write_atomic(&sum_path(&path), checksum(&serialized).as_bytes())
            .and_then(|()| fsutil::write_atomic(&path, &serialized));
        if let Err(e) = stored {
            tracing::warn!(entry = %path.display(), error = %e, "could not store compiled code");
        }
        Ok(program)
    }

    fn load(&self, engine: &Engine, path: &Path, kind: WasmKind) -> std::result::Result<CompiledProgram, String> {
        let expected = fs::read_to_string(sum_path(path)).map_err(|e| format!("no checksum: {e}"))?;
        let bytes = fs::read(path).map_err(|e| e.to_string())?;
        let actual = checksum(&bytes);
        if actual != expected.trim() {
            return Err(format!("checksum mismatch: {actual} != {}", expected.trim()));
        }
        drop(bytes);
        // SAFETY: see the module comment: the file is our own, verified, never written in place.
        let loaded = unsafe {
            match kind {
                WasmKind::Module => Module::deserialize_file(engine, path).map(CompiledProgram::Module),
                WasmKind::Component => Component::deserialize_file(engine, path).map(CompiledProgram::Component),
            }
        };
        loaded.map_err(|e| format!("{e:#}"))
    }

    /// Removes every entry for `wasm_digest`, whatever engine compiled it.
    pub fn forget(&self, wasm_digest: &str) {
        let hex = wasm_digest.strip_prefix("sha256:").unwrap_or(wasm_digest);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(hex) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

fn sum_path(entry: &Path) -> PathBuf {
    entry.with_extension("cwasm.sum")
}

/// `crc32:<hex> len:<bytes>` of an entry.
fn checksum(bytes: &[u8]) -> String {
    format!("crc32:{:08x} len:{}", crc32fast::hash(bytes), bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_once_then_loads_and_rebuilds_corrupt_entries() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CompiledCache::new(dir.path(), &engine).unwrap();
        let wasm = wat::parse_str("(module (func (export \"f\")))").unwrap();
        let digest = crate::sha256_digest(&wasm);
        let mut compiles = 0;
        let mut get = |cache: &CompiledCache| {
            cache
                .load_or_compile(&engine, "t", &digest, WasmKind::Module, || {
                    compiles += 1;
                    Ok(wasm.clone())
                })
                .unwrap()
        };
        get(&cache);
        assert!(cache.contains(&digest));
        let again = CompiledCache::new(dir.path(), &engine).unwrap();
        let CompiledProgram::Module(m) = get(&again) else { panic!("module expected") };
        assert!(m.get_export("f").is_some());
        drop(m);
        // Corrupt the entry: it must be detected and rebuilt, not loaded.
        let entry = again.entry(&digest);
        let mut bytes = fs::read(&entry).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        fs::write(&entry, bytes).unwrap();
        get(&again);
        assert_eq!(compiles, 2);
    }

    #[test]
    fn invalid_wasm_names_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CompiledCache::new(dir.path(), &engine).unwrap();
        let mut wasm = wat::parse_str("(module (func (export \"f\")))").unwrap();
        wasm.truncate(wasm.len() - 3);
        let err = cache
            .load_or_compile(&engine, "docker.io/library/bad:1", "sha256:00", WasmKind::Module, || Ok(wasm))
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("docker.io/library/bad:1: invalid wasm"), "{err}");
    }
}
