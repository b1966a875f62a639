#!/usr/bin/env bash
# The serving and socket benchmarks behind benches/RESULTS.md's figures. Starts its own
# daemon on the demo models (rankd bench --start) for each run, so runs do not
# share state. Usage: benches/load.sh [duration, default 10s]
#
# rankd bench gives its 10,000 most frequent users a history first
# (--populate: items of one or two clusters of the demo catalogue); the
# cold-user case (no state anywhere: every query is the tower of a zero input
# and every item ties) is its own scenario below. Every run's figures go to
# a JSON file; the summary at the end is read from them.
set -euo pipefail
cd "$(dirname "$0")/.."
dur="${1:-10s}"
cargo build --release --quiet
bin=target/release/rankd
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
n=0
run() {
    n=$((n + 1))
    local name="$1"
    shift
    echo "\$ rankd bench $*"
    "$bin" bench --start models --quiet --json "$out/$(printf %02d "$n")-$name.json" "$@"
    echo
}

echo "== recommend, closed loop: HTTP and socket, 32 and 64 clients"
run closed-http-32 --transport http --concurrency 32 --duration "$dur"
run closed-uds-32 --transport uds --concurrency 32 --duration "$dur"
run closed-http-64 --transport http --concurrency 64 --duration "$dur"
run closed-uds-64 --transport uds --concurrency 64 --duration "$dur"

# Open loop at half and 90% of each transport's closed-loop saturation (the
# better of its two closed-loop runs above).
saturation() {
    python3 - "$out" "$1" <<'EOF'
import glob, json, sys
print(int(max(json.load(open(f))[0]["throughput_rps"] for f in glob.glob(f"{sys.argv[1]}/*-closed-{sys.argv[2]}-*.json"))))
EOF
}
for t in uds http; do
    sat="$(saturation "$t")"
    echo "== recommend, $t, open loop at 50% and 90% of its saturation ($sat req/s)"
    for share in 50 90; do
        run "open-$t-$share" --transport "$t" --rate "$((sat * share / 100))" --duration "$dur"
    done
done

# The demo model answers a user without state from the popular items
# (cold_start = "popular"), so this measures that path, not a scan.
echo "== cold users: recommend with no user state, socket, 32 clients"
run cold-uds-32 --transport uds --concurrency 32 --duration "$dur" --populate 0

echo "== socket overhead: health round trip, one connection, closed loop"
run health-uds-1 --transport uds --op health --concurrency 1 --duration "$dur" --populate 0

echo "== recommend at the same offered rate (open loop): socket vs HTTP"
rate="${RATE:-1500}"
run fixed-uds --transport uds --rate "$rate" --duration "$dur"
run fixed-http --transport http --rate "$rate" --duration "$dur"

echo "== pipelining: 64 requests in flight on one connection vs 64 connections"
run pipe-1conn --transport uds --concurrency 64 --connections 1 --duration "$dur"
run pipe-64conn --transport uds --concurrency 64 --connections 64 --duration "$dur"

echo "== summary"
python3 - "$out" <<'EOF'
import glob, json, os, sys
print("| run | req/s | p50 ms | p99 ms | requests/batch | model answers/s | backend alone at that batch size | served / backend |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    r = json.load(open(f))[0]
    name = os.path.basename(f)[3:-5]
    b = r.get("batches") or {}
    lat = r["latency_us"]
    cells = [name, f"{r['throughput_rps']:,.0f}", f"{lat['p50'] / 1000:.2f}", f"{lat['p99'] / 1000:.2f}"]
    if b.get("batches"):
        cells += [f"{b['mean_requests']:.1f}", f"{b['executed_rps']:,.0f}", f"{b['kernel_rps']:,.0f}", f"{100 * b['serving_vs_kernel']:.1f}%"]
    else:
        cells += ["", "", "", ""]
    print("| " + " | ".join(cells) + " |")
EOF
