//! wasmlet's runtime: pod sandboxes and WebAssembly containers on one shared wasmtime engine,
//! and the CRI v1 server over them.

pub mod cpu;
pub mod cri;
mod descriptors;
pub mod engine;
mod error;
mod http;
mod journal;
pub mod logs;
pub mod model;
pub mod net;
mod podfiles;
mod runtime;
pub mod server;
pub mod stdio;
mod streaming;

pub use error::{Error, Result};
pub use runtime::{
    EXEC_OUTPUT_LIMIT, Event, EventKind, ExecOutput, RUNTIME_HANDLERS, Runtime, RuntimeOptions, Usage, default_run_dir,
    default_run_dir_for, now_nanos,
};
