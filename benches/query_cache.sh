#!/usr/bin/env bash
# The per-user query cache on a replay where users ask several times between
# clicks: closed-loop `rankd bench` over the socket (32 callers, 5,000 users
# with histories, Zipf popularity; `--clicks 0.2`: a fifth of the calls are a
# click that extends the user's history, so a user asks about four times
# between clicks) against a daemon with the cache (the default
# --query-cache-bytes) and the same binary with it off, in alternating runs.
# Models: the demo two_tower, and, with --python and --reference (a Python
# with torch and a clone of pmixer/SASRec.pytorch, as benches/sasrec.sh), a
# serving-size sasrec (d = 64, L = 50, 2 blocks, 3,416 items).
#
#   benches/query_cache.sh [--python PY --reference CHECKOUT] [PAIRS] [SECONDS]
#
# Prints each run (calls/s counting clicks, p50 and p99 in µs, the cache's hit
# ratio), then per model the medians and on/off.
set -euo pipefail
cd "$(dirname "$0")/.."
py="" reference=""
if [ "${1:-}" = --python ]; then
  [ "${3:-}" = --reference ] || { sed -n '2,15p' "$0"; exit 2; }
  py="$2" reference="$4"
  shift 4
fi
pairs="${1:-3}" secs="${2:-8}"
cargo build --locked --release -p rankd-cli --bin rankd 2>/dev/null
target/release/rankd models generate --models models >/dev/null
work="$(mktemp -d)"
daemon=""
cleanup() {
  [ -z "$daemon" ] || kill "$daemon" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# model name, repository, bench arguments
models=("demo|$PWD/models|--items 100000 --clusters $PWD/models/catalogues/demo/clusters.csv")
if [ -n "$py" ]; then
  mkdir -p "$work/sasrec-repo/sasrec"
  "$py" benches/sasrec_ort.py make --reference "$reference" --out "$work/sasrec-model" >/dev/null
  mkdir -p "$work/sasrec-repo/sasrec/1"
  cp "$work/sasrec-model/model.pth" "$work/sasrec-model/model.toml" "$work/sasrec-repo/sasrec/1/"
  models+=("sasrec|$work/sasrec-repo|--items 3416")
fi

# One run: prints "MODEL MODE calls/s p50 p99 hit_ratio".
run() {
  local model="$1" repo="$2" extra="$3" mode="$4" sock="$work/rankd.sock" cache=()
  [ "$mode" = off ] && cache=(--query-cache-bytes 0)
  rm -f "$sock"
  target/release/rankd serve --models "$repo" --http 127.0.0.1:0 --uds "$sock" \
    --snapshot-dir "" --device cpu "${cache[@]}" >"$work/ready" 2>"$work/rankd.log" &
  daemon=$!
  for _ in $(seq 1 300); do [ -s "$work/ready" ] && break; sleep 0.1; done
  local http
  http="$(tr ';' '\n' <"$work/ready" | grep -o 'http://[0-9.:]*' | head -1)"
  : >"$work/ready"
  # shellcheck disable=SC2086
  target/release/rankd bench --uds "$sock" --http "$http" --model "$model" \
    --concurrency 32 --populate 5000 --users 5000 --clicks 0.2 --duration "${secs}s" \
    --warmup 1s --quiet --json "$work/bench.json" $extra >/dev/null 2>"$work/bench.log" ||
    { cat "$work/bench.log" >&2; exit 1; }
  curl -s "$http/metrics" >"$work/metrics.txt"
  kill "$daemon"; wait "$daemon" 2>/dev/null || true; daemon=""
  python3 - "$model" "$mode" "$work/bench.json" "$work/metrics.txt" <<'PY'
import json, re, sys
model, mode, path, metrics = sys.argv[1:]
r = json.load(open(path))[0]
def total(name):
    return sum(float(m[1]) for m in re.finditer(rf'^{name}\{{model="{model}"\}} (\S+)', open(metrics).read(), re.M))
hits, misses = total("rankd_query_cache_hits_total"), total("rankd_query_cache_misses_total")
ratio = hits / (hits + misses) if hits + misses else 0.0
l = r["latency_us"]
print(f"{model} {mode} {r['throughput_rps']:.0f} {l['p50']:.0f} {l['p99']:.0f} {ratio:.3f}")
PY
}

log="$work/runs.txt"
for m in "${models[@]}"; do
  IFS='|' read -r model repo extra <<<"$m"
  for _ in $(seq "$pairs"); do
    run "$model" "$repo" "$extra" on | tee -a "$log"
    run "$model" "$repo" "$extra" off | tee -a "$log"
  done
done
python3 - "$log" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    model, mode, rps, p50, p99, ratio = line.split()
    runs.setdefault((model, mode), []).append((float(rps), float(p50), float(p99), float(ratio)))
print("\n| model | cache | calls/s | p50 µs | p99 µs | hit ratio |")
print("|---|---|---|---|---|---|")
for model in dict.fromkeys(m for m, _ in runs):
    med = {}
    for mode in ("on", "off"):
        rs = runs[(model, mode)]
        med[mode] = [statistics.median(x[i] for x in rs) for i in range(4)]
        rps, p50, p99, ratio = med[mode]
        print(f"| {model} | {mode} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {ratio:.2f} |")
    print(f"| {model} | on/off | {med['on'][0] / med['off'][0]:.2f}× | | | |")
PY
