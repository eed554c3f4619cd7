#!/usr/bin/env bash
# The serving benchmark (docs/benchmarks.md): builds the release wasmlet, installs the peers
# when missing (wasmtime-cli 48.0.8 from crates.io, wrk from Debian), and runs
# tests/benches/net_serve.rs: wrk against the wasi:http handler and the wasi:sockets server in
# wasmlet pods (through their host ports) and against the same components under wasmtime.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p wasmlet
if ! command -v wasmtime >/dev/null || ! wasmtime --version | grep -q '^wasmtime 48\.'; then
    echo "installing wasmtime-cli 48.0.8 (about 12 minutes on 2 cores)"
    cargo install -q wasmtime-cli --version 48.0.8 --locked
fi
if ! command -v wrk >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y -qq wrk >/dev/null
fi
cargo bench -q -p wasmlet-tests --bench net_serve
