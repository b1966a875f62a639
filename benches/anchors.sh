#!/usr/bin/env bash
# rankd's CPU scan against two anchors on the same table and queries, in one
# run (benches/RESULTS.md, "Against FAISS and numpy"): FAISS IndexFlatIP and numpy (GEMM,
# argpartition, a sort of the top k), at batch 1, 4, 16, 64 and 256, k = 10,
# each user's history excluded, on every core. The Rust side
# (`cargo bench --bench forward -- --anchors DIR`) writes the demo item table
# and 256 users' query vectors (20-item histories through the demo tower) and
# times rankd's scan and the two roofs (streaming read, matmul); the Python
# side (benches/anchors.py) times FAISS and numpy over the same files. The
# three alternate, PASSES times, each in its own process, and the table gives
# each one's median over all its samples, the ratios to rankd and the
# memory and compute bounds from the same run; all three on one thread are
# timed too, for reference (on a shared machine a busy core stalls a
# two-thread OpenMP loop at its barrier).
# FAISS and numpy are pinned in benches/anchors-requirements.txt and installed
# once into ~/.cache/rankd/tools/anchors-<hash of that file>/.
# Usage: benches/anchors.sh [rounds per pass, default 10] [passes, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
passes="${2:-3}"

tools="${RANKD_TOOLS:-$HOME/.cache/rankd/tools}"
req=benches/anchors-requirements.txt
env="$tools/anchors-$(sha256sum "$req" | cut -c1-12)"
if [ ! -f "$env/.complete" ]; then
  echo "== installing the anchors of $req into $env (once)" >&2
  rm -rf "$env"
  python3 -m pip install --quiet --disable-pip-version-check --target "$env" -r "$req"
  touch "$env/.complete"
fi

echo "== building benches/forward.rs" >&2
bench="$(cargo bench --bench forward --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "forward":
        print(m["executable"])')"
[ -x "$bench" ] || { echo "no forward bench executable from cargo" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
threads="$(nproc)"
py() { OPENBLAS_NUM_THREADS="${blas:-$threads}" PYTHONPATH="$env" python3 benches/anchors.py "$@"; }
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for pass in $(seq "$passes"); do
  echo "== pass $pass of $passes: rankd, FAISS, numpy, then the three on one thread ($rounds rounds each)" >&2
  "$bench" --anchors "$work" "$rounds" >/dev/null
  py time "$work" "$rounds" faiss
  py time "$work" "$rounds" numpy
  py time "$work" "$rounds" faiss1
  blas=1 py time "$work" "$rounds" numpy1
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $threads CPUs, $(grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo no AVX-512), $(grep -q avx2 /proc/cpuinfo && echo AVX2 || echo no AVX2); load average $load_before before, $load_after after"
py report "$work"
