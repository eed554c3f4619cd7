#!/usr/bin/env bash
# The node pod startup benchmark (docs/benchmarks.md): builds the release wasmlet, unpacks the
# Kubernetes binaries from ../shared/k8s, then runs tests/benches/node_start.rs: a control
# plane and a `wasmlet node` on this machine, a 100-replica Deployment, SEQUENTIAL pods one
# after another, then PODS pods in all; prints p50/p99 of creation-to-Running (watched) and
# the node's RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
export PODS=${PODS:-1000} SEQUENTIAL=${SEQUENTIAL:-30}
bash ../shared/k8s/install.sh "$PWD/target/k8s" >/dev/null
export WASMLET_K8S_BIN="$PWD/target/k8s"
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-tests --bench node_start
