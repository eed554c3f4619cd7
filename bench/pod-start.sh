#!/usr/bin/env bash
# The end-to-end pod start benchmark (docs/benchmarks.md): builds the release wasmlet, installs
# the peer (wasmtime-cli 48.0.8 from crates.io) when missing, and runs tests/benches/pod_start.rs:
# RunPodSandbox -> hello exit over the CRI socket for PODS pods, then `wasmtime run` of the same
# module PROCS times as a process, in the same run; then again with every pod on the host's
# network (NETWORK=host) to show what a pod's own namespace costs, and rootless pods without
# pasta (PASTA=, no way out) to show what theirs costs. Also runs the criterion
# benches.
set -euo pipefail
cd "$(dirname "$0")/.."
export PODS=${PODS:-1000} PROCS=${PROCS:-200}
cargo build --release -q -p wasmlet
if ! command -v wasmtime >/dev/null || ! wasmtime --version | grep -q '^wasmtime 48\.'; then
    echo "installing wasmtime-cli 48.0.8 (about 12 minutes on 2 cores)"
    cargo install -q wasmtime-cli --version 48.0.8 --locked
fi
cargo bench -q -p wasmlet-tests --bench pod_start
PASTA= cargo bench -q -p wasmlet-tests --bench pod_start
NETWORK=host cargo bench -q -p wasmlet-tests --bench pod_start
cargo bench -q -p wasmlet-tests --bench pull_start
if [ "${CRITERION:-1}" = 1 ]; then
    cargo bench -q -p wasmlet-runtime --bench start -- --noplot
fi
