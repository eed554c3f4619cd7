#!/usr/bin/env bash
# The README's first command: starts a wasmlet CRI server on a unix socket in a temporary
# directory and runs the hello pod through it with `wasmlet pod run`: offline, no root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p wasmlet
bin=target/debug/wasmlet
dir=$(mktemp -d)
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
"$bin" image import examples/hello.wat --tag hello --root "$dir/root" >/dev/null
# Pods get network namespaces of their own (rootless mode). Where this machine lets no
# unprivileged user make namespaces (some distributions restrict it), use the host's network.
printf 'run_dir = "%s"\n' "$dir/run" >"$dir/wasmlet.toml"
if [ "$(id -u)" -ne 0 ] && ! unshare --user --map-root-user --net true 2>/dev/null; then
    echo "note: user namespaces are not available here; pods use the host's network" >&2
    printf '[network]\nmode = "host"\n' >>"$dir/wasmlet.toml"
fi
"$bin" cri --config "$dir/wasmlet.toml" --root "$dir/root" --socket "$dir/cri.sock" 2>"$dir/server.log" &
server=$!
echo "wasmlet CRI server on $dir/cri.sock; running the hello pod through it:"
if ! "$bin" pod run --socket "$dir/cri.sock" --image hello --log-dir "$dir/logs" -- "${1:-wasmlet}"; then
    echo "--- server log ---" >&2
    cat "$dir/server.log" >&2
    exit 1
fi
