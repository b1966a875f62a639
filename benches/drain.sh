#!/usr/bin/env bash
# Drain time for benches/RESULTS.md ("Drain time"): a daemon serving
# 1,000 recommends in flight over the socket (closed loop, users with
# histories) gets SIGTERM; the figure is the time from the signal to the
# process's exit, against --grace-ms. Repeated a few times.
# Usage: benches/drain.sh [runs, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
cargo build --release --quiet -p rankd-cli
bin="$PWD/target/release/rankd"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp -r models "$work/models"
"$bin" models generate --models "$work/models" >/dev/null
port=18495

for run in $(seq "$runs"); do
  rm -rf "$work/state"
  "$bin" serve --models "$work/models" --http "127.0.0.1:$port" --uds "$work/rankd.sock" \
    --snapshot-dir "$work/state" --device cpu >"$work/ready" 2>"$work/rankd.log" &
  pid=$!
  for _ in $(seq 200); do grep -q ready "$work/ready" 2>/dev/null && break; sleep 0.1; done
  grep -q ready "$work/ready" || { echo "rankd did not start: $(cat "$work/rankd.log")" >&2; exit 1; }
  # 1,000 callers on 4 connections (the socket holds 256 in flight each).
  "$bin" bench --uds "$work/rankd.sock" --http "http://127.0.0.1:$port" --quiet \
    --users 10000 --populate 10000 --concurrency 1000 --connections 4 --duration 30s \
    >"$work/bench.out" 2>&1 &
  bench=$!
  sleep 4
  depth="$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^rankd_queue_depth\{model="demo",priority="interactive"\}/ {print $2}')"
  t0="$(date +%s.%N)"
  kill -TERM "$pid"
  status=0
  wait "$pid" || status=$?
  t1="$(date +%s.%N)"
  kill "$bench" 2>/dev/null || true
  wait "$bench" 2>/dev/null || true
  echo "run $run: queue depth at the signal $depth, exit status $status after $(python3 -c "print(round(($t1 - $t0) * 1000))") ms"
  rm -f "$work/ready"
done
