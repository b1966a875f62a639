#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need
# (the Kafka-protocol broker, NVRTC and Prometheus, once each, cached by version under
# ~/.cache/rankd/tools), checks formatting and lints, builds everything (the
# GPU code included) and a rankd without the default features (no CUDA, no
# Kafka), then runs the unit and integration tests against the real daemon:
# without the features first, then every test against the full rankd last
# (CI reads the closing lines of that last cargo test).
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

# Prometheus and promtool (Debian's package, unpacked without installing it:
# no root needed) for the tests of docker/monitoring/.
PROMETHEUS_VERSION=2.42.0
PROMETHEUS_DEB_VERSION=2.42.0+ds-5+b6
prom="$tools/prometheus-$PROMETHEUS_VERSION"
if [ ! -x "$prom/usr/bin/prometheus" ] || [ ! -x "$prom/usr/bin/promtool" ]; then
  echo "== installing prometheus $PROMETHEUS_DEB_VERSION into $prom (once)"
  dl="$(mktemp -d)"
  # A fresh machine may have no package lists yet: read them once, then retry.
  (cd "$dl" && { apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" ||
    { apt-get update -qq && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION"; }; })
  rm -rf "$prom"
  dpkg-deb -x "$dl"/prometheus_*.deb "$prom"
  rm -rf "$dl"
fi
export RANKD_PROMETHEUS="$prom/usr/bin/prometheus"
export RANKD_PROMTOOL="$prom/usr/bin/promtool"

# The Python tools (the client's tests and the deploy-file checks), pinned in
# scripts/python-tools.txt, installed once per change of that file.
pyreq=scripts/python-tools.txt
pytools="$tools/python-$(sha256sum "$pyreq" | cut -c1-12)"
if [ ! -f "$pytools/.complete" ]; then
  echo "== installing the Python tools of $pyreq into $pytools (once)"
  rm -rf "$pytools"
  python3 -m pip install --quiet --disable-pip-version-check --target "$pytools" -r "$pyreq"
  touch "$pytools/.complete"
fi

echo "== format"
cargo fmt --all --check

# In the release profile, so that the build scripts (librdkafka's C build
# among them) and proc macros are the release build's, not built twice.
echo "== lints (clippy, every warning an error)"
cargo clippy --release --workspace --all-targets --locked -- -D warnings

echo "== build (release: the tests drive the optimised daemon)"
cargo build --release --workspace --all-targets --locked

echo "== GPU check, host side (the GPU parts run where a GPU is: benches/gpu/check.sh)"
OUT="$(mktemp -d)" benches/gpu/check.sh --dry-run

# rankd-tools' ingest_bench needs `kafka` and is skipped here.
echo "== build without the default features (no CUDA, no Kafka, no OTLP)"
cargo build --release --workspace --no-default-features --locked
deps="$(cargo tree -p rankd-cli --no-default-features -e normal --locked)"
for dep in rdkafka cudarc nvml-wrapper opentelemetry-otlp; do
  if grep -q " $dep v" <<<"$deps"; then
    echo "rankd-cli without the default features still depends on $dep" >&2
    exit 1
  fi
done

# Every unit test, and the integration tests that need neither (HTTP, the
# socket, device selection) against the featureless rankd; tests/daemon/kafka.rs
# and the CUDA ones are empty without their features (the test binaries still
# link rdkafka for their own producer; the rankd under test does not). One cargo invocation, so
# the workspace is built once more, not once per package.
echo "== tests without the default features"
cargo test --release --workspace --no-default-features --locked

# The Python client against the release rankd, and the deploy files (hadolint,
# the Compose schema, the Kubernetes schemas, flags against `rankd serve
# --help`, the README's configuration reference against the CLI). The package
# must also install as a user would install it.
echo "== Python client and deploy files"
pip_check="$(mktemp -d)"
python3 -m pip install --quiet --disable-pip-version-check --no-deps \
  --target "$pip_check" ./clients/python
test -f "$pip_check/rankd/__init__.py"
rm -rf "$pip_check" clients/python/build clients/python/rankd.egg-info
PATH="$pytools/bin:$PATH" PYTHONPATH="$PWD/clients/python:$pytools" RANKD_BIN="$PWD/target/release/rankd" \
  python3 -m pytest -q -p no:cacheprovider --timeout 300 clients/python/tests tests/deploy

# Last, so the run ends on a suite's summary: the unit tests of every crate
# and the integration tests, against the full rankd (CUDA and Kafka).
echo "== tests"
cargo test --release --workspace --locked
