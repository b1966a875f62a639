#!/usr/bin/env bash
# The "10,000,000-item catalogue" figures of benches/RESULTS.md: a generated
# catalogue (`rankd models generate --items N`, d = 64, drawn like the demo's),
# the time and memory `rankd serve` takes to load it, and recommend latency at
# batch 1 and under closed-loop load, f32 and cpu_scoring = "exact-int8".
#
# Usage: benches/catalogue.sh [items, default 10000000] [duration per run, default 30s]
#   RANKD_BIN=path      the binary to measure (default: target/release/rankd, built here)
#   RANKD_OLD_BIN=path  also measure this binary's load of the same catalogue
#                       (e.g. the previous commit's build), alternating with RANKD_BIN
#   ROUNDS=n            load measurements per binary (default 2)
#
# Everything is written under one temporary folder (about 2.8 GB for 10M
# items), removed at the end. The daemon runs with --snapshot-dir '' and its
# own socket; `rankd bench` drives it over the socket from the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
items="${1:-10000000}"
dur="${2:-30s}"
rounds="${ROUNDS:-2}"
if [ -z "${RANKD_BIN:-}" ]; then
    cargo build --release --quiet
fi
bin="$(realpath "${RANKD_BIN:-target/release/rankd}")"
old="${RANKD_OLD_BIN:+$(realpath "$RANKD_OLD_BIN")}"
work="$(mktemp -d "${TMPDIR:-/tmp}/rankd-catalogue.XXXXXX")"
pid=""
cleanup() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# kB field of /proc/$pid/status, in MiB
status_mib() { awk -v k="$1:" '$1 == k { printf "%.0f", $2 / 1024 }' "/proc/$pid/status"; }
# The machine's busy and total clock ticks (/proc/stat), and the daemon's.
ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; printf "%d %d ", t - $5 - $6, t }' /proc/stat
    if [ -n "$pid" ]; then awk '{ print $14 + $15 }' "/proc/$pid/stat"; else echo 0; fi
}
# other_share BEFORE AFTER [OWN_TICKS]: the share of the machine's CPU time
# between two `ticks` samples that went neither to the daemon nor to OWN_TICKS
# (the load generator): other work on the machine during a measurement.
other_share() {
    awk -v a="$1" -v b="$2" -v own="${3:-0}" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        printf "%.0f%%", 100 * (y[1] - x[1] - (y[3] - x[3]) - own) / (y[2] - x[2]) }'
}

# serve BIN REPO: starts the daemon and waits for its ready line; sets pid,
# http and ready_s (seconds from the start to the ready line).
serve() {
    local b="$1" repo="$2" t0 before
    rm -f "$work/rankd.sock"
    : >"$work/out"
    before="$(ticks)"
    t0="$(now)"
    RANKD_LOG=warn "$b" serve --models "$repo" --http 127.0.0.1:0 \
        --uds "$work/rankd.sock" --snapshot-dir '' >"$work/out" 2>"$work/log" &
    pid=$!
    until grep -q '^ready:' "$work/out"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$work/log" >&2
            echo "rankd serve exited before its ready line" >&2
            exit 1
        fi
        sleep 0.02
    done
    ready_s="$(secs "$t0" "$(now)")"
    # The daemon's ticks counted from 0: it started after `before`.
    other="$(other_share "${before% *} 0" "$(ticks)")"
    http="$(grep -o 'http://[0-9.:]*' "$work/out" | head -1)"
}
stop() {
    kill "$pid"
    wait "$pid" || true
    pid=""
}

echo "== machine"
lscpu | grep -E 'Model name|^CPU\(s\)' || true
if grep -q avx512f /proc/cpuinfo; then echo "AVX-512: yes"; else echo "AVX-512: no"; fi
grep -o 'avx512_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '
echo
echo "memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary: $bin${old:+; old: $old}"
echo

echo "== generate: $bin models generate --items $items"
/usr/bin/time -f "wall %e s, peak RSS %M kB" "$bin" models generate --models "$work/repo" --items "$items" >/dev/null
table="$work/repo/catalogues/demo/items.safetensors"
echo "items file: $(stat -c %s "$table") bytes"
"$bin" models generate --models "$work/demo" >/dev/null
echo

echo "== baseline: the 100,000-item demo"
serve "$bin" "$work/demo"
echo "ready in ${ready_s} s; VmHWM $(status_mib VmHWM) MiB, VmRSS $(status_mib VmRSS) MiB"
base_rss="$(status_mib VmRSS)"
stop
echo

echo "== load: $items items (page cache warm: the file was just written)"
bins=("$bin")
[ -n "$old" ] && bins+=("$old")
for r in $(seq "$rounds"); do
    for b in "${bins[@]}"; do
        serve "$b" "$work/repo"
        hwm="$(status_mib VmHWM)"
        rss="$(status_mib VmRSS)"
        name="new"
        [ "$b" = "$old" ] && name="old"
        echo "round $r, $name: ready in ${ready_s} s; VmHWM $hwm MiB, VmRSS $rss MiB; VmHWM - baseline = $((hwm - base_rss)) MiB; other work: $other of the CPUs"
        stop
    done
done
echo

# The exact-int8 model: the demo's tower and catalogue, cpu_scoring = "exact-int8".
mkdir -p "$work/repo/demo-int8/1"
sed -e 's|^weights = "weights.safetensors"|weights = "../../demo/1/weights.safetensors"\ncpu_scoring = "exact-int8"|' \
    "$work/repo/demo/1/model.toml" >"$work/repo/demo-int8/1/model.toml"
grep -q '^cpu_scoring = "exact-int8"' "$work/repo/demo-int8/1/model.toml"

echo "== recommend latency (socket, k = 10; 10,000 users, each with a history of"
echo "   1-50 items of one or two clusters of the catalogue, written first)"
serve "$bin" "$work/repo"
echo "with demo-int8: ready in ${ready_s} s; VmHWM $(status_mib VmHWM) MiB, VmRSS $(status_mib VmRSS) MiB"
mkdir -p "$work/res"
n=0
populate=10000
for model in demo demo-int8; do
    for c in 1 8 32; do
        n=$((n + 1))
        echo "\$ rankd bench --transport uds --model $model --concurrency $c --duration $dur --users 10000 --populate $populate --clusters .../clusters.csv --timeout-ms 60000"
        run="$work/res/$(printf %02d "$n")-$model-$c"
        before="$(ticks)"
        /usr/bin/time -f "%U %S" -o "$run.time" \
            "$bin" bench --transport uds --uds "$work/rankd.sock" --http "$http" \
            --model "$model" --concurrency "$c" --duration "$dur" \
            --users 10000 --populate "$populate" \
            --clusters "$work/repo/catalogues/demo/clusters.csv" \
            --timeout-ms 60000 --quiet --json "$run.json" >/dev/null
        own="$(awk -v hz="$(getconf CLK_TCK)" '{ print ($1 + $2) * hz }' "$run.time")"
        other_share "$before" "$(ticks)" "$own" >"$run.other"
        populate=0
    done
done
echo "after the runs: VmHWM $(status_mib VmHWM) MiB, VmRSS $(status_mib VmRSS) MiB (with the int8 copy)"
stop
echo

echo "== summary (other work: the share of the machine's CPU time that went to"
echo "   neither the daemon nor the load generator during the run)"
python3 - "$work/res" <<'EOF'
import glob, json, os, sys
print("| model | clients | req/s | p50 ms | p99 ms | requests per batch | requests | errors | other work |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    r = json.load(open(f))[0]
    model, clients = os.path.basename(f)[3:-5].rsplit("-", 1)
    lat = r["latency_us"]
    b = r.get("batches") or {}
    per = f"{b['mean_requests']:.1f}" if b.get("batches") else ""
    errors = sum(r["errors"].values())
    other = open(f[:-5] + ".other").read().strip()
    print(f"| {model} | {clients} | {r['throughput_rps']:,.1f} | {lat['p50'] / 1000:.1f} | {lat['p99'] / 1000:.1f} | {per} | {r['requests']} | {errors} | {other} |")
EOF
