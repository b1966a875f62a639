#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need
# (the Kafka-protocol broker, NVRTC, Prometheus and the Python tools, once each,
# cached by version under ~/.cache/rankd/tools; scripts/tools.sh), checks
# formatting and lints, builds everything (the GPU code included) and a rankd
# without the default features (no CUDA, no Kafka), then runs the unit and integration tests against the real daemon:
# without the features first, then every test against the full rankd last
# (CI reads the closing lines of that last cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tools (scripts/tools.sh): first what will be installed and whether each
# pinned artifact is still obtainable (seconds), then the installs (minutes,
# once per version).
source scripts/tools.sh
tools_plan
tools_install
export LD_LIBRARY_PATH="$RANKD_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
pytools="$pytools_root"

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
echo "== build and lints without the default features (no CUDA, no Kafka, no OTLP)"
cargo build --release --workspace --no-default-features --locked
cargo clippy --release --workspace --all-targets --no-default-features --locked -- -D warnings
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
# --help`, the configuration reference in docs/configuration.md against the
# CLI), the links between the documents, and the documents' example requests
# against the demo models. The package must also install as a user would
# install it.
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
