#!/usr/bin/env bash
# Model lifecycle figures for benches/RESULTS.md, on users with histories
# (rankd bench --populate): recommend latency while a new version is copied
# into the repository and swapped in, against a steady run just before it;
# and recommend throughput with a 90/10 split and online evaluation against
# the same daemon setup without either, in alternating runs.
# Usage: benches/lifecycle.sh [duration, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."
dur="${1:-10s}"
cargo build --release --quiet -p rankd-cli
bin="$PWD/target/release/rankd"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp -r models "$work/models"
"$bin" models generate --models "$work/models" >/dev/null
echo admin-bench-token > "$work/admin"
port=18480

start() { # start <log> <extra args...>: a daemon on $port and $work/rankd.sock
  local log="$1"; shift
  "$bin" serve --models "$work/models" --http "127.0.0.1:$port" --uds "$work/rankd.sock" \
    --snapshot-dir "" --device cpu "$@" >"$work/ready" 2>"$log" &
  pid=$!
  for _ in $(seq 200); do grep -q ready "$work/ready" 2>/dev/null && return; sleep 0.1; done
  echo "rankd did not start: $(cat "$log")" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; rm -f "$work/ready"; }
bench() { "$bin" bench --uds "$work/rankd.sock" --http "http://127.0.0.1:$port" --quiet "$@"; }
admin() { curl -sf -H "Authorization: Bearer admin-bench-token" -X POST "http://127.0.0.1:$port/v1/admin/models/demo/$1" -d "$2" >/dev/null; }

echo "== reload under load: recommend over the socket, 32 callers"
rm -rf "$work/models/demo/2"
start "$work/reload.log" --repository-poll-ms 200
echo "-- steady state (version 1)"
bench --concurrency 32 --duration "$dur"
echo "-- the same load while version 2 is copied in (files first, READY last) and takes over"
( sleep 2; mkdir -p "$work/staging"; cp -r "$work/models/demo/1" "$work/staging/2";
  cp -r "$work/staging/2" "$work/models/demo/2"; touch "$work/models/demo/2/READY" ) &
bench --concurrency 32 --duration "$dur" --warmup 0s
grep -E "loaded and warmed|retired|unloaded" "$work/reload.log" | sed 's/^/   log: /'
stop

echo "== cost of a 90/10 split and of online evaluation (alternating runs)"
one() { # one <label> <split: yes|no> <serve args...>
  local label="$1" split="$2"; shift 2
  start "$work/cost.log" --admin-token-file "$work/admin" --repository-poll-ms 0 "$@"
  if [ "$split" = yes ]; then
    admin load '{"version": 1}'
    admin traffic '{"split": {"1": 90, "2": 10}}'
  fi
  echo "-- $label"
  bench --concurrency 32 --duration "$dur" | grep -E -A1 "req/s|batches" | grep -v "^--"
  stop
}
for round in 1 2; do
  one "round $round: no split, online evaluation off" no --online-eval-users 0
  one "round $round: no split, online evaluation on" no
  one "round $round: split 90/10, online evaluation off" yes --online-eval-users 0
  one "round $round: split 90/10, online evaluation on" yes
done
