//! Images for wasmlet: references, the content-addressed local store and the compiled-code cache.
//!
//! The store keeps every blob under `blobs/sha256/<hex>`, verified against its digest, and an
//! index of images (`index.json`) written atomically and guarded by a file lock so that the
//! `wasmlet image` CLI and a running server can share one root.

pub mod compat;
mod compiled;
mod error;
pub mod fsutil;
pub mod hosts;
mod ingest;
pub mod oci;
mod pull;
mod reference;
pub mod registry;
mod store;
pub mod timefmt;
mod wasm;

pub use compiled::{CompiledCache, CompiledProgram};
pub use error::{Error, Result};
pub use hosts::{Endpoint, HostConfig, RegistryHosts};
pub use ingest::{BlobWriter, Ingest, Observer, Progress, StagedBlob};
pub use pull::{pull, pull_from, push_wasm};
pub use reference::Reference;
pub use registry::{Auth, OciRegistry, Registry};
pub use store::{BlobSource, FsUsage, ImageRecord, ImageRun, ImageStore, NewImage};
pub use wasm::{WasmKind, sha256_digest};
