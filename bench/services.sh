#!/usr/bin/env bash
# The Services benchmark (docs/benchmarks.md): builds the release wasmlet, unpacks the Kubernetes
# binaries from ../shared/k8s, then runs tests/benches/services.rs: a control plane and a
# `wasmlet node` on a bridge of the bench's own, and a wasm client calling a wasm server through
# the Service's ClusterIP and directly at its pod IP, REQUESTS requests a round, ROUNDS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
export REQUESTS=${REQUESTS:-2000} ROUNDS=${ROUNDS:-3}
bash ../shared/k8s/install.sh "$PWD/target/k8s" >/dev/null
export WASMLET_K8S_BIN="$PWD/target/k8s"
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-tests --bench services
