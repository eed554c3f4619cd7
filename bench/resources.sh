#!/usr/bin/env bash
# The resources benchmark (docs/benchmarks.md): builds the release wasmlet, then runs in one
# go the CPU-metering criterion bench (runtime/benches/cpu.rs: a compute-bound guest on plain
# wasmtime and on wasmlet's engine, without and with a quota) and tests/benches/resources.rs
# (a light HTTP pod's latency beside 10 busy pods, with and without limits; stats calls at
# PODS pods).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-runtime --bench cpu -- --noplot 2>&1 | grep -E "^[a-z].*|time:" 
cargo bench -q -p wasmlet-tests --bench resources
