#!/usr/bin/env bash
# Filtered recommends against unfiltered ones, side by side in one run: the
# demo catalogue (100,000 items) gets three attributes, `half` (row % 2),
# `twentieth` (row % 20) and `two_hundredth` (row % 200), so a filter on
# value 0 keeps 50%, 5% or 0.5% of the items. Each case is a fresh daemon
# (rankd bench --start) whose 10,000 most frequent users have a history
# (--populate), measured one request at a time (batch 1) and with 32
# clients in a closed loop, over the socket.
# Usage: benches/filter.sh [duration per run, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."
dur="${1:-10s}"
cargo build --release --quiet
bin="$PWD/target/release/rankd"
repo="$(mktemp -d)"
out="$(mktemp -d)"
trap 'rm -rf "$repo" "$out"' EXIT
cp -r models/demo models/demo-ranker "$repo/"
"$bin" models generate --models "$repo" >/dev/null
python3 - "$repo/catalogues/demo" <<'EOF'
import json, struct, sys
folder = sys.argv[1]
with open(f"{folder}/items.safetensors", "rb") as f:
    (n_header,) = struct.unpack("<Q", f.read(8))
    rows = json.loads(f.read(n_header))["ids"]["shape"][0]
columns = {"half": 2, "twentieth": 20, "two_hundredth": 200}
header, data, offset = {}, b"", 0
for name, m in columns.items():
    values = struct.pack(f"<{rows}q", *(r % m for r in range(rows)))
    header[name] = {"dtype": "I64", "shape": [rows], "data_offsets": [offset, offset + len(values)]}
    data += values
    offset += len(values)
head = json.dumps(header).encode()
head += b" " * (-len(head) % 8)
with open(f"{folder}/attributes.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + data)
EOF

run() {
    local name="$1" clients="$2"
    shift 2
    echo "\$ rankd bench --start <demo + attributes> --transport uds --concurrency $clients $*"
    "$bin" bench --start "$repo" --quiet --transport uds --concurrency "$clients" \
        --duration "$dur" --json "$out/$name-$clients.json" "$@"
    echo
}
for clients in 1 32; do
    run none "$clients"
    run 50pct "$clients" --filter '{"half": 0}'
    run 5pct "$clients" --filter '{"twentieth": 0}'
    run 0.5pct "$clients" --filter '{"two_hundredth": 0}'
done

python3 - "$out" <<'EOF'
import json, sys
print("| filter keeps | clients | req/s | p50 ms | p99 ms | p50 vs no filter | errors |")
print("|---|---|---|---|---|---|---|")
for clients in (1, 32):
    base = None
    for name, label in (("none", "all (no filter)"), ("50pct", "50%"), ("5pct", "5%"), ("0.5pct", "0.5%")):
        r = json.load(open(f"{sys.argv[1]}/{name}-{clients}.json"))[0]
        p50, p99 = r["latency_us"]["p50"] / 1000, r["latency_us"]["p99"] / 1000
        base = base or p50
        errors = sum(r["errors"].values())
        print(f"| {label} | {clients} | {r['throughput_rps']:.0f} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f}x | {errors} |")
EOF
