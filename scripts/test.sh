#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs the Kafka-protocol
# broker the ingestion tests run against (once, cached by version), builds
# everything (the GPU code included), then runs every unit and integration
# test against the real daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_VERSION=0.6.0
tools="${RANKD_TOOLS:-$HOME/.cache/rankd/tools}"
export RANKD_TANSU="$tools/tansu-$TANSU_VERSION/bin/tansu"
if [ ! -x "$RANKD_TANSU" ]; then
  echo "== installing tansu $TANSU_VERSION into $tools (once; about 9 minutes on 2 cores)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql \
    --root "$tools/tansu-$TANSU_VERSION"
fi

echo "== build (release: the tests drive the optimised daemon)"
cargo build --release --all-targets --locked

echo "== tests"
cargo test --release --locked
