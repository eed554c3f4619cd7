#!/usr/bin/env bash
# The pod worker benchmark (docs/benchmarks.md): builds the release wasmlet, then runs
# tests/benches/pods_ready.rs: `wasmlet run` to a Ready pod (HTTP server + readiness probe,
# periodSeconds 1) RUNS times, then PODS such pods at once, measuring the CPU and memory of the
# one wasmlet process that keeps them Ready, with and without their probes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PODS=${PODS:-1000} RUNS=${RUNS:-20} WINDOW_SECONDS=${WINDOW_SECONDS:-30}
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-tests --bench pods_ready
