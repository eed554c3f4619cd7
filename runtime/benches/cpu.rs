//! Criterion benchmark of CPU metering: one compute-bound guest (a fixed loop, about 0.1 s),
//! run on plain wasmtime (no epoch interruption, no metering: the floor), on plain wasmtime
//! with epoch checks compiled in but never triggered (their own cost), and on wasmlet's
//! engine metered (epoch yields every 1 ms, each poll timed and run on a core token) without a
//! quota and with one it never reaches, in the same run.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmlet_runtime::engine::{GuestMeter, GuestSpec, Outcome, WasmEngine};
use wasmlet_runtime::logs::{GuestOutput, Stream};

/// About 60 million iterations of integer work whose result is checked.
const COMPUTE: &str = r#"(module
  (func $work (result i64) (local $i i64) (local $x i64)
    (local.set $x (i64.const 1))
    (loop $l
      (local.set $x (i64.add (i64.mul (local.get $x) (i64.const 6364136223846793005)) (i64.const 1442695040888963407)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 60000000))))
    (local.get $x))
  (func (export "_start") (if (i64.eq (call $work) (i64.const 0)) (then unreachable))))"#;

fn spec() -> GuestSpec {
    GuestSpec::new(vec!["compute".into()], GuestOutput::discard(Stream::Stdout), GuestOutput::discard(Stream::Stderr))
}

fn metering(c: &mut Criterion) {
    let wasm = wat::parse_str(COMPUTE).unwrap();
    let mut g = c.benchmark_group("compute-bound guest (60 M iterations)");
    g.sample_size(20).measurement_time(Duration::from_secs(8));

    let plain = wasmtime::Engine::default();
    let module = wasmtime::Module::new(&plain, &wasm).unwrap();
    g.bench_function("plain wasmtime, no metering", |b| {
        b.iter(|| {
            let mut store = wasmtime::Store::new(&plain, ());
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
            start.call(&mut store, ()).unwrap();
        })
    });

    // The same with wasmtime's epoch checks compiled into the guest's loops, and a deadline
    // never reached: what the checks that let wasmlet preempt cost by themselves.
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    let checked = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::new(&checked, &wasm).unwrap();
    g.bench_function("plain wasmtime with epoch checks, never interrupted", |b| {
        b.iter(|| {
            let mut store = wasmtime::Store::new(&checked, ());
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
            start.call(&mut store, ()).unwrap();
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(dir.path().to_path_buf()).unwrap();
    let digest = wasmlet_images::sha256_digest(&wasm);
    let program = engine.program("compute", &digest, wasmlet_images::WasmKind::Module, || Ok(wasm.clone())).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let run = |meter: Arc<GuestMeter>| {
        let out = rt.block_on(engine.spawn(engine.run(&program, spec(), meter))).unwrap();
        assert_eq!(out, Outcome::Exited(0));
    };
    g.bench_function("wasmlet, metered, no quota", |b| b.iter(|| run(Arc::new(GuestMeter::default()))));
    g.bench_function("wasmlet, metered, a quota of 100 cores (never reached)", |b| {
        b.iter(|| {
            let meter = Arc::new(GuestMeter::default());
            meter.cpu.set(10_000_000, 100_000, 1024);
            run(meter)
        })
    });
    g.finish();
}

criterion_group!(benches, metering);
criterion_main!(benches);
