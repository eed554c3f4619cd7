//! Criterion benchmarks of the in-process start path (no gRPC): instantiating and running the
//! example hello module on the shared engine, and a whole pod through the `Runtime` API.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmlet_runtime::engine::{GuestMeter, GuestSpec, WasmEngine};
use wasmlet_runtime::logs::{GuestOutput, Stream};
use wasmlet_runtime::model::{ContainerMetadata, ContainerSpec, ImageSpec, SandboxMetadata, SandboxSpec};
use wasmlet_runtime::{EventKind, Runtime};

fn hello() -> Vec<u8> {
    let wat = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello.wat")).unwrap();
    wat::parse_str(wat).unwrap()
}

fn engine_run(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(dir.path().to_path_buf()).unwrap();
    let wasm = hello();
    let digest = wasmlet_images::sha256_digest(&wasm);
    let program = engine.program("hello", &digest, wasmlet_images::WasmKind::Module, || Ok(wasm)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    c.bench_function("instantiate and run hello (preview 1 module)", |b| {
        b.iter(|| {
            let spec = GuestSpec::new(
                vec!["hello".into()],
                GuestOutput::discard(Stream::Stdout),
                GuestOutput::discard(Stream::Stderr),
            );
            rt.block_on(engine.run(&program, spec, Arc::new(GuestMeter::default())))
        })
    });
}

fn runtime_pod(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::open(dir.path().join("root")).unwrap();
    runtime.images().import(&hello(), Some("hello")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let logs = dir.path().join("logs");
    let mut n = 0u64;
    c.bench_function("pod through the Runtime API: run, create, start, exit", |b| {
        b.iter(|| {
            n += 1;
            let spec = SandboxSpec {
                metadata: SandboxMetadata {
                    name: format!("p{n}"),
                    uid: format!("u{n}"),
                    namespace: "bench".into(),
                    attempt: 0,
                },
                log_directory: logs.join(n.to_string()).display().to_string(),
                ..Default::default()
            };
            rt.block_on(async {
                let mut events = runtime.subscribe();
                let sb = runtime.run_sandbox(spec).unwrap();
                let container = ContainerSpec {
                    metadata: ContainerMetadata { name: "hello".into(), attempt: 0 },
                    image: ImageSpec { image: "hello".into(), ..Default::default() },
                    log_path: "hello/0.log".into(),
                    ..Default::default()
                };
                let id = runtime.create_container(&sb, container).await.unwrap();
                runtime.start_container(&id).unwrap();
                loop {
                    let ev = events.recv().await.unwrap();
                    if ev.container_id == id && ev.kind == EventKind::Stopped {
                        break;
                    }
                }
                runtime.remove_sandbox(&sb).await.unwrap();
            })
        })
    });
}

criterion_group!(benches, engine_run, runtime_pod);
criterion_main!(benches);
