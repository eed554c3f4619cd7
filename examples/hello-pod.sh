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
"$bin" cri --root "$dir/root" --socket "$dir/cri.sock" 2>"$dir/server.log" &
server=$!
echo "wasmlet CRI server on $dir/cri.sock; running the hello pod through it:"
if ! "$bin" pod run --socket "$dir/cri.sock" --image hello --log-dir "$dir/logs" -- "${1:-wasmlet}"; then
    echo "--- server log ---" >&2
    cat "$dir/server.log" >&2
    exit 1
fi
