#!/usr/bin/env bash
# The README's first command: runs examples/demo.yaml with `wasmlet run` (no cluster, offline,
# no root) for a while, then deletes the pod gracefully. The images are built from the WAT
# sources next to this script. Usage: bash examples/demo.sh [DURATION] (default 45s).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p wasmlet
bin=target/debug/wasmlet
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export WASMLET_ROOT="$dir/root"
"$bin" image import examples/tools.wat --tag tools:1 >/dev/null
"$bin" image import examples/web.wat --tag web:1 >/dev/null
# Pods get network namespaces of their own (on wasmlet's bridge as root, rootless otherwise).
# Where this machine lets no unprivileged user make namespaces (some distributions restrict
# it), use the host's network.
printf 'run_dir = "%s"\n' "$dir/run" >"$dir/wasmlet.toml"
if [ "$(id -u)" -ne 0 ] && ! unshare --user --map-root-user --net true 2>/dev/null; then
    echo "note: user namespaces are not available here; pods use the host's network" >&2
    printf '[network]\nmode = "host"\n' >>"$dir/wasmlet.toml"
fi
"$bin" run --config "$dir/wasmlet.toml" --logs --stop-after "${1:-45s}" examples/demo.yaml
