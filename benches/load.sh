#!/usr/bin/env bash
# The serving and socket benchmarks behind the README's figures. Starts its own
# daemon on the demo models (rankd bench --start) for each run, so runs do not
# share state. Usage: benches/load.sh [duration, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."
dur="${1:-10s}"
cargo build --release --quiet
bin=target/release/rankd
run() { echo "\$ rankd bench $*"; "$bin" bench --start models --quiet "$@"; echo; }

# rankd bench gives its 10,000 most frequent users a history first
# (--populate); the cold-user case (no state anywhere: every query is the
# tower of a zero input and every item ties) is its own scenario below.
echo "== recommend, closed loop, 32 clients: HTTP and socket"
run --transport http --concurrency 32 --duration "$dur"
run --transport uds --concurrency 32 --duration "$dur"

echo "== cold users: recommend with no user state (the all-ties case), socket, 32 clients"
run --transport uds --concurrency 32 --duration "$dur" --populate 0

echo "== socket overhead: health round trip, one connection, closed loop"
run --transport uds --op health --concurrency 1 --duration "$dur"

echo "== recommend at the same offered rate (open loop): socket vs HTTP"
rate="${RATE:-1500}"
run --transport uds --rate "$rate" --duration "$dur"
run --transport http --rate "$rate" --duration "$dur"

echo "== pipelining: 64 requests in flight on one connection vs 64 connections"
run --transport uds --concurrency 64 --connections 1 --duration "$dur"
run --transport uds --concurrency 64 --connections 64 --duration "$dur"
