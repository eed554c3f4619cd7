#!/usr/bin/env bash
# The streaming benchmark (docs/benchmarks.md): builds the release wasmlet, unpacks crictl from
# ../shared/k8s, then runs tests/benches/streaming.rs: exec round trips (wasmlet's Exec over
# SPDY, fork+exec of /bin/echo, crictl exec) and 100 MB through port forwarding (crictl over
# SPDY and WebSocket, wasmlet's CLI, an in-process client) against a direct connection and
# plain relays, for a host-network pod and (as root) a bridge pod, in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/k8s/install.sh "$PWD/target/k8s" >/dev/null
export WASMLET_K8S_BIN="$PWD/target/k8s"
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-tests --bench streaming
