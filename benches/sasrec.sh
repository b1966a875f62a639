#!/usr/bin/env bash
# The sasrec tower alone: rankd's CPU backend (candle) beside ONNX Runtime
# running the same checkpoint exported from PyTorch, on the same users, in
# alternating rounds, with 1 and 2 threads each. Needs a Python with torch,
# onnx and onnxruntime (not the test suite's: a developer's), and a clone of
# the reference implementation (pmixer/SASRec.pytorch).
#
#   benches/sasrec.sh --python PY --reference CHECKOUT [PAIRS] [ROUNDS]
#
# Prints each round, then per thread count and batch size the median time
# per batch of each side and ONNX Runtime's time over rankd's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --python ] && [ "${3:-}" = --reference ] || {
  sed -n '2,9p' "$0"
  exit 2
}
py="$2" reference="$4" pairs="${5:-5}" rounds="${6:-200}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" benches/sasrec_ort.py make --reference "$reference" --out "$work/model"
cargo bench --locked --bench sasrec --no-run 2>/dev/null
log="$work/rounds.txt"
for pair in $(seq "$pairs"); do
  for threads in 1 2; do
    RAYON_NUM_THREADS=$threads cargo bench --locked --bench sasrec -- "$work/model" "$rounds" 2>/dev/null |
      sed "s/^/threads $threads /" | tee -a "$log"
    "$py" benches/sasrec_ort.py time "$work/model" "$rounds" "$threads" |
      sed "s/^/threads $threads /" | tee -a "$log"
  done
done
python3 - "$log" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"threads (\d+) (\w+) batch (\d+): ([\d.]+) ms", line)
    if m:
        runs.setdefault((int(m[1]), int(m[3]), m[2]), []).append(float(m[4]))
print("\n| threads | batch | rankd ms | onnxruntime ms | onnxruntime / rankd |")
print("|---|---|---|---|---|")
for threads, batch in sorted({(t, b) for t, b, _ in runs}):
    r = statistics.median(runs[(threads, batch, "rankd")])
    o = statistics.median(runs[(threads, batch, "onnxruntime")])
    print(f"| {threads} | {batch} | {r:.3f} | {o:.3f} | {o / r:.2f}× |")
PY
