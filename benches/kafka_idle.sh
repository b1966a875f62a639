#!/usr/bin/env bash
# What Kafka ingestion costs while its topics are idle: closed-loop recommend
# over the socket (`rankd bench`, 64 callers, users with histories) against a
# daemon with ingestion on (a tansu broker on this machine, rankd's three
# topics of 3 partitions, no messages) and against the same binary with
# ingestion off, alternating in short pairs; and the CPU the broker and rankd
# use meanwhile, read from /proc/<pid>/stat, idle and under load.
#
#   benches/kafka_idle.sh [PAIRS] [SECONDS]
#
# Prints each run, then the medians: req/s on and off, on/off, and the cores
# (CPU seconds per second) the broker and rankd used.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs="${1:-5}" secs="${2:-5}"
source scripts/tools.sh
[ -x "$RANKD_TANSU" ] || { echo "tansu is not installed at $RANKD_TANSU (scripts/test.sh installs it)" >&2; exit 1; }
cargo build --locked --release -p rankd-cli --bin rankd -p rankd-tools --bin ingest_bench 2>/dev/null
target/release/rankd models generate --models models >/dev/null
work="$(mktemp -d)"
broker=""
daemon=""
cleanup() {
  [ -z "$daemon" ] || kill "$daemon" 2>/dev/null || true
  [ -z "$broker" ] || kill "$broker" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="tcp://127.0.0.1:$port"
(cd "$work" && exec "$RANKD_TANSU" broker --storage-engine sqlite://tansu.db \
  --listener-url "$url" --advertised-listener-url "$url") >/dev/null 2>"$work/tansu.log" &
broker=$!
for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
timeout 60 target/release/ingest_bench create-topics --brokers "127.0.0.1:$port" --partitions 3 >/dev/null

# CPU seconds (user + system) a process has used.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

# One run: a daemon (with Kafka when $1 = on), idle for $secs, then loaded
# for $secs; prints "MODE req/s broker_idle rankd_idle broker_load rankd_load".
run() {
  local mode="$1" sock="$work/rankd.sock" kafka=()
  [ "$mode" = on ] && kafka=(--kafka-brokers "127.0.0.1:$port" --kafka-group "idle-$RANDOM")
  rm -f "$sock"
  target/release/rankd serve --models models --http 127.0.0.1:0 --uds "$sock" \
    --snapshot-dir "$work/state-$mode" "${kafka[@]}" >"$work/ready" 2>"$work/rankd-$mode.log" &
  daemon=$!
  for _ in $(seq 1 300); do [ -s "$work/ready" ] && break; sleep 0.1; done
  : >"$work/ready"
  sleep 2 # partitions assigned, fetching
  local b0 r0 b1 r1 b2 r2
  b0="$(cpu "$broker")" r0="$(cpu "$daemon")"
  sleep "$secs"
  b1="$(cpu "$broker")" r1="$(cpu "$daemon")"
  target/release/rankd bench --uds "$sock" --http "http://127.0.0.1:1" --model demo \
    --concurrency 64 --connections 4 --populate 5000 --users 5000 --duration "${secs}s" \
    --warmup 1s --quiet --json "$work/bench.json" >/dev/null 2>&1
  b2="$(cpu "$broker")" r2="$(cpu "$daemon")"
  kill "$daemon"; wait "$daemon" 2>/dev/null || true; daemon=""
  python3 - "$mode" "$work/bench.json" "$secs" "$b0" "$r0" "$b1" "$r1" "$b2" "$r2" <<'PY'
import json, sys
mode, path, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
b0, r0, b1, r1, b2, r2 = map(float, sys.argv[4:])
rps = json.load(open(path))[0]["throughput_rps"]
load = secs + 1 + 1.5  # measured run, warm-up, populate and start-up around it
print(f"{mode} {rps:.0f} {(b1 - b0) / secs:.3f} {(r1 - r0) / secs:.3f} {(b2 - b1) / load:.3f} {(r2 - r1) / load:.3f}")
PY
}

log="$work/runs.txt"
for _ in $(seq "$pairs"); do
  run on | tee -a "$log"
  run off | tee -a "$log"
done
python3 - "$log" <<'PY'
import statistics, sys
runs = {"on": [], "off": []}
for line in open(sys.argv[1]):
    mode, *v = line.split()
    runs[mode].append([float(x) for x in v])
med = lambda mode, i: statistics.median(r[i] for r in runs[mode])
on, off = med("on", 0), med("off", 0)
print("\n| ingestion | req/s | broker cores, idle | rankd cores, idle | broker cores, loaded | rankd cores, loaded |")
print("|---|---|---|---|---|---|")
for mode in ["on", "off"]:
    print(f"| {mode} | {med(mode, 0):.0f} | {med(mode, 1):.3f} | {med(mode, 2):.3f} | {med(mode, 3):.3f} | {med(mode, 4):.3f} |")
ratios = sorted(a[0] / b[0] for a, b in zip(runs["on"], runs["off"]))
print(f"\non/off: {on / off:.3f} (medians); per pair {', '.join(f'{r:.3f}' for r in ratios)}")
PY
