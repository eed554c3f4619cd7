#!/usr/bin/env bash
# The rootless outbound benchmark (docs/benchmarks.md), as root: builds the release wasmlet, then
# runs tests/benches/outbound.rs: a rootless pod (wasmlet as nobody, pasta) and the host each
# send MB MiB to a sink in a network namespace the bench makes, ROUNDS times.
set -euo pipefail
cd "$(dirname "$0")/.."
export MB=${MB:-200} ROUNDS=${ROUNDS:-3}
command -v pasta >/dev/null || { echo "pasta is missing: apt-get install passt" >&2; exit 1; }
cargo build --release -q -p wasmlet
cargo bench -q -p wasmlet-tests --bench outbound
