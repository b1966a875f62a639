#!/usr/bin/env bash
# Kafka ingestion benchmarks through a real broker (targets 2-4 of
# benches/INGEST-RESULTS.md): for each round, starts a fresh tansu broker
# (sqlite storage, working folder = a temporary folder, a free port) exactly as
# tests/common/kafka.rs does, creates the topics with the admin API, runs
# `ingest_bench run` (the bin of rankd-tools, crates/tools/src/ingest_bench;
# it starts and stops rankd and rankd bench itself), and stops the broker.
# Prints every round's figures at the end.
#
# Usage: benches/ingest.sh [rounds, default 2]
#   INGEST_ARGS="--messages 100000 --bench-rate 1800"  extra options for `run`
#   INGEST_OUT=DIR                                    where the figures go
# The update-path benchmark without a broker (target 1) is separate:
#   cargo bench --bench ingest
set -euo pipefail
cd "$(dirname "$0")/.."

rounds="${1:-2}"
tansu="${RANKD_TANSU:-$HOME/.cache/rankd/tools/tansu-0.6.0/bin/tansu}"
if [ ! -x "$tansu" ]; then
  echo "tansu is not installed at $tansu (scripts/test.sh installs it; or set RANKD_TANSU)" >&2
  exit 1
fi

echo "== build"
# One build of both, so that the daemon library is built once, with the
# features of both packages.
cargo build --release -p rankd-cli --bin rankd -p rankd-tools --bin ingest_bench
target/release/rankd models generate --models models >/dev/null
ex=target/release/ingest_bench

out="${INGEST_OUT:-target/ingest-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
work="$(mktemp -d)"
pids="$work/pids"
broker_pid=""

stop_broker() {
  if [ -n "$broker_pid" ]; then
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
    broker_pid=""
  fi
}
cleanup() {
  # Whatever ingest_bench started (rankd serve, rankd bench), if it died first.
  if [ -f "$pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$pids"
  fi
  stop_broker
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${RANKD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "nproc: $(nproc)"
  echo "cpu: $(lscpu | grep 'Model name' | sed 's/.*: *//')"
  echo "tansu: $tansu"
} | tee "$out/machine.txt"

for i in $(seq 1 "$rounds"); do
  dir="$work/round$i"
  mkdir -p "$dir/rankd"
  port="$(free_port)"
  url="tcp://127.0.0.1:$port"
  echo "== round $i: tansu on $url (sqlite, in $dir)"
  (cd "$dir" && exec "$tansu" broker --storage-engine sqlite://tansu.db \
    --listener-url "$url" --advertised-listener-url "$url") >/dev/null 2>"$dir/tansu.log" &
  broker_pid=$!
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {
    echo "tansu did not listen within 20 s" >&2
    cat "$dir/tansu.log" >&2
    exit 1
  }
  timeout 60 "$ex" create-topics --brokers "127.0.0.1:$port" --partitions 3
  # shellcheck disable=SC2086
  timeout 1200 "$ex" run --brokers "127.0.0.1:$port" --rankd target/release/rankd \
    --models models --workdir "$dir/rankd" --out "$out/round$i.json" --pids "$pids" \
    --broker-pid "$broker_pid" \
    ${INGEST_ARGS:-} || status=$?
  mkdir -p "$out/round$i-logs"
  cp "$dir/tansu.log" "$dir"/rankd/*.log "$dir"/rankd/bench-*.txt "$out/round$i-logs/" 2>/dev/null || true
  stop_broker
  if [ "${status:-0}" -ne 0 ]; then
    echo "round $i failed (exit ${status}); logs in $out/round$i-logs" >&2
    exit "$status"
  fi
done

echo "== all rounds (figures in $out)"
"$ex" summarize "$out"/round*.json | tee "$out/table.md"
