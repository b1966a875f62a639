#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need
# (the Kafka-protocol broker and NVRTC, once each, cached by version under
# ~/.cache/rankd/tools), builds everything (the GPU code included), then runs
# every unit and integration test against the real daemon.
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

# NVRTC alone (no driver, no GPU) compiles the CUDA kernels, so every run checks
# that kernels/*.cu still compile for the GPUs rankd targets.
NVRTC_VERSION=13.0.88
nvrtc="$tools/nvrtc-$NVRTC_VERSION"
if [ ! -f "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  echo "== installing NVRTC $NVRTC_VERSION into $nvrtc (once)"
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc" \
    "nvidia-cuda-nvrtc==$NVRTC_VERSION"
fi
export RANKD_NVRTC_LIB="$nvrtc/nvidia/cu13/lib"
export LD_LIBRARY_PATH="$RANKD_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== build (release: the tests drive the optimised daemon)"
cargo build --release --all-targets --locked

echo "== GPU check, host side (the GPU parts run where a GPU is: benches/gpu/check.sh)"
OUT="$(mktemp -d)" benches/gpu/check.sh --dry-run

echo "== tests"
cargo test --release --locked
