#!/usr/bin/env bash
# The whole test suite, from a clean checkout: builds everything (the GPU code
# included), then runs every unit and integration test against the real daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build (release: the tests drive the optimised daemon)"
cargo build --release --all-targets --locked

echo "== tests"
cargo test --release --locked
