#!/usr/bin/env bash
# onnx graphs alone, side by side (benches/onnx.rs): the PyTorch fixtures
# (tests/fixtures/onnx) and serving-size models (benches/onnx_models.py: a
# YouTube-DNN tower and a SASRec tower at d = 64, L = 50, beside the same
# weights as `two_tower` and `sasrec` models, and a DCN-v2 ranker), each onnx
# graph on tract and on ONNX Runtime, at batch 1, 16 and 64. Needs a Python
# with torch, onnx and onnxscript (a developer's, not the test suite's) and
# ONNX Runtime's library (scripts/tools.sh installs it).
#
#   benches/onnx.sh --python PY [PAIRS] [ROUNDS]
#
# RANKD_ONNX_THREADS (default 1) bounds ONNX Runtime's intra-op threads;
# RAYON_NUM_THREADS the native kinds' (tract runs on one).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --python ] || {
  sed -n '2,13p' "$0"
  exit 2
}
py="$2" pairs="${3:-3}" rounds="${4:-100}"
source scripts/tools.sh
[ -f "$RANKD_ONNXRUNTIME_LIB" ] || tools_install >/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" benches/onnx_models.py "$work" >/dev/null 2>&1
cargo bench --locked --bench onnx --no-run 2>/dev/null
fixtures=tests/fixtures/onnx
cargo bench --locked --bench onnx -- --pairs "$pairs" --rounds "$rounds" \
  "$fixtures"/{tower,sasrec,dcn}-{dynamo,legacy}/1 \
  "$work"/{tower-onnx,tower-native,sasrec-onnx,sasrec-native,dcn-onnx}/1 2>/dev/null

# End to end: closed-loop recommend over the socket (32 callers, 5,000 users
# with 50-item histories) on the same tower served as `two_tower`, as an onnx
# graph on tract and on ONNX Runtime, alternating, one daemon per run (its
# default threads, whatever the standalone part was given).
mkdir -p "$work/e2e/tower-onnx-ort/1"
cp "$work"/tower-onnx/1/model.onnx "$work/e2e/tower-onnx-ort/1/"
sed 's/^kind = "onnx"$/kind = "onnx"\nengine = "onnxruntime"/' "$work"/tower-onnx/1/model.toml \
  >"$work/e2e/tower-onnx-ort/1/model.toml"
cp -r "$work"/{catalogues,tower-onnx,tower-native} "$work/e2e/"
cargo build --locked --release --bin rankd 2>/dev/null
for pair in $(seq "$pairs"); do
  for model in tower-native tower-onnx tower-onnx-ort; do
    env -u RAYON_NUM_THREADS -u RANKD_ONNX_THREADS target/release/rankd bench --start "$work/e2e" --model "$model" --populate 5000 --users 5000 \
      --items 20000 --history-len 50 --duration 5s --warmup 1s --concurrency 32 --quiet \
      --json "$work/e2e-$model-$pair.json" >/dev/null 2>&1
  done
done
python3 - "$work" "$pairs" <<'PY'
import json, statistics, sys
work, pairs = sys.argv[1], int(sys.argv[2])
print("\n| model | req/s | p50 ms | p99 ms |")
print("|---|---|---|---|")
for model in ["tower-native", "tower-onnx", "tower-onnx-ort"]:
    runs = [json.load(open(f"{work}/e2e-{model}-{p}.json"))[0] for p in range(1, pairs + 1)]
    rps = statistics.median(r["throughput_rps"] for r in runs)
    p50 = statistics.median(r["latency_us"]["p50"] for r in runs) / 1e3
    p99 = statistics.median(r["latency_us"]["p99"] for r in runs) / 1e3
    print(f"| {model} | {rps:.0f} | {p50:.2f} | {p99:.2f} |")
PY
