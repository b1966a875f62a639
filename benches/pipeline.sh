#!/usr/bin/env bash
# A pipeline (demo → 200 candidates → demo-ranker) against the two calls a
# client would otherwise make, over the socket, closed loop, side by side in
# one run (benches/pipeline.py). Needs the Python client's dependency
# (msgpack): the test command's tool cache has it.
# Usage: benches/pipeline.sh [clients, default 16] [seconds per way, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${1:-16}"
seconds="${2:-10}"
cargo build --release --quiet
bin="$PWD/target/release/rankd"
repo="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null; rm -rf "$repo"' EXIT
cp -r models/demo models/demo-ranker "$repo/"
"$bin" models generate --models "$repo" >/dev/null
mkdir -p "$repo/feed/1"
printf 'kind = "pipeline"\nretrieve = "demo"\ncandidates = 200\nrank = "demo-ranker"\n' >"$repo/feed/1/model.toml"
"$bin" serve --models "$repo" --http 127.0.0.1:0 --uds "$repo/rankd.sock" --snapshot-dir '' \
    >"$repo/ready" 2>"$repo/log" &
pid=$!
for _ in $(seq 200); do grep -q '^ready' "$repo/ready" && break; sleep 0.1; done
grep -q '^ready' "$repo/ready" || { cat "$repo/log"; exit 1; }
pytools="$(ls -d "${RANKD_TOOLS:-$HOME/.cache/rankd/tools}"/python3*-* 2>/dev/null | head -1)"
PYTHONPATH="$PWD/clients/python${pytools:+:$pytools}" python3 benches/pipeline.py "$repo/rankd.sock" "$clients" "$seconds"
