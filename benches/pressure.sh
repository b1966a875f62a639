#!/usr/bin/env bash
# Priority classes and streaming bulk scoring, on users with histories, for
# benches/RESULTS.md ("Under pressure"). One daemon, the demo
# model; every figure below is measured in this one run, side by side:
#   1. closed-loop recommend capacity over the socket (32 callers);
#   2. a bulk call of recommend lines alone: rows/s against (1);
#   3. interactive open-loop recommend at half of (1): p99 alone, then with a
#      bulk call saturating the daemon beside it;
#   4. a bulk call of 5 million score lines (about 1.1 GiB) streamed from a
#      generator: the daemon's RSS growth.
# Usage: benches/pressure.sh [duration, default 10s] [bulk score lines, default 5000000]
set -euo pipefail
cd "$(dirname "$0")/.."
dur="${1:-10s}"
score_lines="${2:-5000000}"
cargo build --release --quiet -p rankd-cli
bin="$PWD/target/release/rankd"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp -r models "$work/models"
"$bin" models generate --models "$work/models" >/dev/null
port=18490
url="http://127.0.0.1:$port"
users=10000

"$bin" serve --models "$work/models" --http "127.0.0.1:$port" --uds "$work/rankd.sock" \
  --snapshot-dir "" --device cpu >"$work/ready" 2>"$work/rankd.log" &
pid=$!
for _ in $(seq 200); do grep -q ready "$work/ready" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$work/ready" || { echo "rankd did not start: $(cat "$work/rankd.log")" >&2; exit 1; }

bench() { "$bin" bench --uds "$work/rankd.sock" --http "$url" --quiet --users "$users" "$@"; }
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r=r[-1] if isinstance(r,list) else r; print(eval(sys.argv[2], {}, r))' "$@"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }

# Every one of the $users users gets a history (bench --populate writes
# them); the bulk lines use the same ids (bench's user of rank r).
bench --populate "$users" --requests 1 --concurrency 1 >/dev/null
recommend_lines() { # recommend_lines <n>: n recommend lines over the populated users
  python3 - "$1" "$users" <<'PY'
import sys
n, users = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout
for i in range(n):
    rank = 1 + i % users
    user = ((rank * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> 16
    out.write('{"user_id": %d, "k": 10}\n' % user)
PY
}
bulk() { # bulk <file or -> : streams it to the bulk route, prints the answer lines
  curl -sS --fail -T "$1" -X POST -H 'Content-Type: application/x-ndjson' "$url/v1/models/demo/bulk"
}

echo "== 1. closed-loop recommend capacity (socket, 32 callers, $dur)"
bench --populate 0 --concurrency 32 --duration "$dur" --json "$work/closed.json"
capacity="$(field "$work/closed.json" throughput_rps)"
echo "capacity: $capacity req/s"

echo "== 2. bulk recommend lines alone"
n_bulk="$(python3 -c "print(int(float('$capacity') * 10))")"
recommend_lines "$n_bulk" >"$work/bulk.ndjson"
t0="$(date +%s.%N)"
answered="$(bulk "$work/bulk.ndjson" | grep -c '"items"')"
t1="$(date +%s.%N)"
bulk_rate="$(python3 -c "print(round($answered / ($t1 - $t0)))")"
echo "bulk: $answered of $n_bulk lines in $(python3 -c "print(round($t1 - $t0, 2))") s = $bulk_rate rows/s"
echo "bulk / closed loop: $(python3 -c "print(round($bulk_rate / float('$capacity'), 3))")"

rate="$(python3 -c "print(int(float('$capacity') / 2))")"
echo "== 3. interactive open loop at $rate req/s ($dur): alone, then beside a saturating bulk call"
bench --populate 0 --rate "$rate" --duration "$dur" --json "$work/alone.json"
recommend_lines $((n_bulk * 3)) >"$work/bulk-long.ndjson"
bulk "$work/bulk-long.ndjson" >"$work/bulk-long.out" &
bulk_pid=$!
sleep 2
bench --populate 0 --rate "$rate" --duration "$dur" --json "$work/beside.json"
beside_lines="$(grep -c '"items"' "$work/bulk-long.out" || true)"
kill "$bulk_pid" 2>/dev/null || true
wait "$bulk_pid" 2>/dev/null || true
p99_alone="$(field "$work/alone.json" 'latency_us["p99"]')"
p99_beside="$(field "$work/beside.json" 'latency_us["p99"]')"
echo "p99 alone: $p99_alone us, beside bulk: $p99_beside us (bulk answered $beside_lines lines meanwhile)"
echo "ratio: $(python3 -c "print(round($p99_beside / $p99_alone, 3))")"
echo "errors alone: $(field "$work/alone.json" errors), beside: $(field "$work/beside.json" errors)"

echo "== 4. $score_lines bulk score lines (30 candidates each) from a generator"
rss0="$(rss_kib)"
( peak="$rss0"; while kill -0 "$pid" 2>/dev/null; do
    r="$(rss_kib)"; [ "$r" -gt "$peak" ] && peak="$r"; echo "$peak" >"$work/peak"; sleep 0.2; done ) &
t0="$(date +%s.%N)"
python3 - "$score_lines" "$users" <<'PY' | tee >(wc -c >"$work/bytes") | bulk - | grep -c '"scores"' >"$work/scored" || true
import random, sys
n, users = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(7)
out = sys.stdout
for i in range(n):
    rank = 1 + i % users
    user = ((rank * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> 16
    items = ", ".join(str(rng.randint(10000, 99999)) for _ in range(30))
    out.write('{"user_id": %d, "items": [%s]}\n' % (user, items))
PY
t1="$(date +%s.%N)"
sleep 0.5
echo "lines scored: $(cat "$work/scored") of $score_lines, body $(python3 -c "print(round($(cat "$work/bytes") / 2**30, 3))") GiB in $(python3 -c "print(round($t1 - $t0, 1))") s"
echo "RSS: $((rss0 / 1024)) MiB before, peak $(( $(cat "$work/peak") / 1024 )) MiB: growth $(( ($(cat "$work/peak") - rss0) / 1024 )) MiB"
kill "$pid"
