# The tools the test suite needs, each pinned by its upstream version and
# cached by that version under $RANKD_TOOLS (default ~/.cache/rankd/tools).
# Sourced by scripts/test.sh, which calls `tools_plan` (a few seconds of index
# look-ups: what will be installed, and is each pinned artifact still there?)
# before `tools_install` (the long part) and before any build, so that an
# artifact that has moved fails the run in seconds, naming it.
#
# What is pinned, and why that and no more:
# - tansu (crates.io): the exact crate version, built with its own Cargo.lock.
# - NVRTC (PyPI nvidia-cuda-nvrtc): the exact wheel version.
# - ONNX Runtime (PyPI onnxruntime, without its Python dependencies): the
#   exact wheel version; the tests load the library inside it
#   (onnxruntime/capi/libonnxruntime.so.<version>) as a user would with
#   --onnxruntime-lib.
# - Prometheus and promtool (Debian's package, unpacked without installing
#   it): the upstream version only. The archive replaces Debian revisions (a
#   binary rebuild `+b6` became the point release `+deb12u1`), so the
#   revision is whatever the archive serves for that upstream version, and
#   the unpacked binaries' own `--version` is checked instead.
# - The Python tools (scripts/python-tools.txt, hadolint among them): exact
#   versions, cached per hash of that file and of the Python version.

TANSU_VERSION=0.6.0
NVRTC_VERSION=13.0.88
ONNXRUNTIME_VERSION=1.32.0
PROMETHEUS_VERSION=2.42.0
PYTHON_TOOLS=scripts/python-tools.txt

tools="${RANKD_TOOLS:-$HOME/.cache/rankd/tools}"
tansu_root="$tools/tansu-$TANSU_VERSION"
nvrtc_root="$tools/nvrtc-$NVRTC_VERSION"
prom_root="$tools/prometheus-$PROMETHEUS_VERSION"
py_version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)"
pytools_root="$tools/python$py_version-$(sha256sum "$PYTHON_TOOLS" | cut -c1-12)"
ort_root="$tools/onnxruntime-$ONNXRUNTIME_VERSION-py$py_version"

export RANKD_TANSU="$tansu_root/bin/tansu"
export RANKD_NVRTC_LIB="$nvrtc_root/nvidia/cu13/lib"
export RANKD_ONNXRUNTIME_LIB="$ort_root/onnxruntime/capi/libonnxruntime.so.$ONNXRUNTIME_VERSION"
export RANKD_PROMETHEUS="$prom_root/usr/bin/prometheus"
export RANKD_PROMTOOL="$prom_root/usr/bin/promtool"

tools_fail() {
  echo "error: $*" >&2
  exit 1
}

# What the plan found missing; reported together at its end.
plan_errors=()
plan_error() {
  plan_errors+=("$*")
  return 1
}

tansu_cached() { [ -x "$RANKD_TANSU" ]; }
nvrtc_cached() { [ -f "$RANKD_NVRTC_LIB/libnvrtc.so.13" ]; }
ort_cached() { [ -f "$RANKD_ONNXRUNTIME_LIB" ]; }
prom_cached() { [ -x "$RANKD_PROMETHEUS" ] && [ -x "$RANKD_PROMTOOL" ]; }
pytools_cached() { [ -f "$pytools_root/.complete" ]; }

# The programs the installs and the build need.
prerequisites() {
  local cmd
  for cmd in curl python3 cargo cc sha256sum; do
    command -v "$cmd" >/dev/null || plan_error "\`$cmd\` is not on PATH: install it first"
  done
  python3 -m pip --version >/dev/null 2>&1 ||
    plan_error "\`python3 -m pip\` does not run: install pip for $(command -v python3 || echo python3) (Debian: python3-pip)"
  cargo fmt --version >/dev/null 2>&1 || plan_error "rustfmt is missing: rustup component add rustfmt"
  cargo clippy --version >/dev/null 2>&1 || plan_error "clippy is missing: rustup component add clippy"
}

# crates.io's sparse index: one JSON line per published version.
tansu_available() {
  local index code
  index="$(mktemp)"
  code="$(curl -sS --max-time 20 -o "$index" -w '%{http_code}' https://index.crates.io/ta/ns/tansu 2>&1)" || {
    rm -f "$index"
    plan_error "could not reach crates.io's index (https://index.crates.io/ta/ns/tansu): $code"
    return 1
  }
  if [ "$code" != 200 ]; then
    rm -f "$index"
    plan_error "crates.io's index answered HTTP $code for tansu: is the crate gone? (TANSU_VERSION in scripts/tools.sh)"
    return 1
  fi
  local rc=0
  python3 -c '
import json, sys
want = sys.argv[1]
for line in open(sys.argv[2]):
    v = json.loads(line)
    if v["vers"] == want:
        sys.exit(2 if v["yanked"] else 0)
sys.exit(1)' "$TANSU_VERSION" "$index" || rc=$?
  rm -f "$index"
  case $rc in
    0) ;;
    2) plan_error "tansu $TANSU_VERSION is yanked on crates.io: pick another version (TANSU_VERSION in scripts/tools.sh) and run the broker tests with it" ;;
    *) plan_error "tansu $TANSU_VERSION is not on crates.io: pick a published version (TANSU_VERSION in scripts/tools.sh)" ;;
  esac
}

# Whether pip's own index (pip.conf and PIP_* honoured) lists `name`
# `version` with a file for this Python and platform: 0 yes, 1 no (the
# versions it does list are printed), 2 pip failed (its message is printed).
pypi_has() {
  local name="$1" version="$2" out err rc=0
  err="$(mktemp)"
  out="$(python3 -m pip index versions --disable-pip-version-check "$name" 2>"$err")" || rc=$?
  if [ "$rc" != 0 ]; then
    grep -v '^WARNING' "$err" | tail -n 2 | tr '\n' ' '
    rm -f "$err"
    return 2
  fi
  rm -f "$err"
  local listed
  listed="$(sed -n 's/^Available versions: //p' <<<"$out")"
  if tr ',' '\n' <<<"$listed" | tr -d ' ' | grep -xF "$version" >/dev/null; then
    return 0
  fi
  echo "$listed" | cut -c1-200
  return 1
}

nvrtc_available() {
  local rc=0 said
  said="$(pypi_has nvidia-cuda-nvrtc "$NVRTC_VERSION")" || rc=$?
  case $rc in
    0) ;;
    1) plan_error "nvidia-cuda-nvrtc $NVRTC_VERSION is not on the Python package index pip uses (it lists: $said): pick a listed 13.0.x version (NVRTC_VERSION in scripts/tools.sh)" ;;
    *) plan_error "pip could not list nvidia-cuda-nvrtc's versions: $said" ;;
  esac
}

ort_available() {
  local rc=0 said
  said="$(pypi_has onnxruntime "$ONNXRUNTIME_VERSION")" || rc=$?
  case $rc in
    0) ;;
    1) plan_error "onnxruntime $ONNXRUNTIME_VERSION is not on the Python package index pip uses for this Python (it lists: $said): pick a listed version (ONNXRUNTIME_VERSION in scripts/tools.sh)" ;;
    *) plan_error "pip could not list onnxruntime's versions: $said" ;;
  esac
}

# Debian's archive: the revision it serves for the pinned upstream version.
prom_revision=""
prom_lookup() {
  prom_revision="$(apt-cache madison prometheus 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    grep -E "^${PROMETHEUS_VERSION//./\\.}\+" | head -n1 || true)"
  [ -n "$prom_revision" ]
}

# Reads the package lists afresh (root only), showing apt's own errors.
apt_refresh() {
  if [ "$(id -u)" != 0 ]; then
    echo "the package lists need refreshing: run \`sudo apt-get update\` once, then this again"
    return 1
  fi
  apt-get update -qq 2>&1 >/dev/null | grep -v '^W:' | tail -n 3
  return "${PIPESTATUS[0]}"
}

prom_available() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    plan_error "Prometheus comes from Debian's archive, and apt-get or dpkg-deb is missing here"
    return 1
  }
  prom_lookup && return 0
  local said
  said="$(apt_refresh)" || {
    plan_error "no prometheus $PROMETHEUS_VERSION in the package lists, and they could not be read again: $said"
    return 1
  }
  prom_lookup ||
    plan_error "Debian's archive has no prometheus $PROMETHEUS_VERSION (it serves: $(apt-cache madison prometheus 2>/dev/null | awk -F'|' '{print $2}' | xargs | sed 's/^$/no prometheus at all/')): pin one of those (PROMETHEUS_VERSION in scripts/tools.sh) and run the monitoring tests"
}

pytools_available() {
  local req name version dir
  dir="$(mktemp -d)"
  while read -r req; do
    req="${req%%#*}"
    req="$(xargs <<<"$req")"
    [ -n "$req" ] || continue
    name="${req%%==*}"
    version="${req#*==}"
    if [ "$name" = "$req" ]; then
      plan_error "$PYTHON_TOOLS: '$req' is not pinned with =="
      continue
    fi
    (
      rc=0
      said="$(pypi_has "$name" "$version")" || rc=$?
      case $rc in
        0) ;;
        1) echo "$name==$version is not on the index (it lists: $said)" >"$dir/$name" ;;
        *) echo "$name==$version: pip could not list its versions: $said" >"$dir/$name" ;;
      esac
    ) &
  done <"$PYTHON_TOOLS"
  wait
  local f
  for f in "$dir"/*; do
    if [ -f "$f" ]; then plan_error "$(cat "$f") (pins in $PYTHON_TOOLS)"; fi
  done
  rm -rf "$dir"
}

# What will be installed and whether it still can be, before anything long
# runs; every problem found is reported, then the run stops.
tools_plan() {
  echo "== tools (cached by version under $tools)"
  prerequisites || true
  if tansu_cached; then echo "   tansu $TANSU_VERSION (crates.io): cached"; elif tansu_available; then
    echo "   tansu $TANSU_VERSION (crates.io): to install, available (cargo install, about 9 minutes on 2 cores)"
  fi
  if nvrtc_cached; then echo "   NVRTC $NVRTC_VERSION (PyPI nvidia-cuda-nvrtc): cached"; elif nvrtc_available; then
    echo "   NVRTC $NVRTC_VERSION (PyPI nvidia-cuda-nvrtc): to install, available"
  fi
  if ort_cached; then echo "   ONNX Runtime $ONNXRUNTIME_VERSION (PyPI onnxruntime): cached"; elif ort_available; then
    echo "   ONNX Runtime $ONNXRUNTIME_VERSION (PyPI onnxruntime): to install, available"
  fi
  if prom_cached; then echo "   prometheus $PROMETHEUS_VERSION (Debian): cached"; elif prom_available; then
    echo "   prometheus $PROMETHEUS_VERSION (Debian): to install, available as $prom_revision"
  fi
  if pytools_cached; then echo "   Python $py_version tools of $PYTHON_TOOLS: cached"; else
    # Called in a list: plan_error's status must not end the plan early.
    pytools_available || true
    [ "${#plan_errors[@]}" -gt 0 ] || echo "   Python $py_version tools of $PYTHON_TOOLS: to install, every pin available"
  fi
  if [ "${#plan_errors[@]}" -gt 0 ]; then
    printf 'error: %s\n' "${plan_errors[@]}" >&2
    exit 1
  fi
}

tools_install() {
  if ! tansu_cached; then
    echo "== installing tansu $TANSU_VERSION into $tansu_root"
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql --root "$tansu_root" ||
      tools_fail "cargo install tansu $TANSU_VERSION failed (above); nothing was cached, the next run tries again"
  fi

  if ! nvrtc_cached; then
    echo "== installing NVRTC $NVRTC_VERSION into $nvrtc_root"
    rm -rf "$nvrtc_root"
    python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc_root" \
      "nvidia-cuda-nvrtc==$NVRTC_VERSION" ||
      tools_fail "pip could not install nvidia-cuda-nvrtc==$NVRTC_VERSION (above)"
    nvrtc_cached || tools_fail "nvidia-cuda-nvrtc $NVRTC_VERSION has no $RANKD_NVRTC_LIB/libnvrtc.so.13: its layout changed"
  fi

  if ! ort_cached; then
    echo "== installing ONNX Runtime $ONNXRUNTIME_VERSION into $ort_root"
    rm -rf "$ort_root"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$ort_root" \
      "onnxruntime==$ONNXRUNTIME_VERSION" ||
      tools_fail "pip could not install onnxruntime==$ONNXRUNTIME_VERSION (above)"
    ort_cached || tools_fail "onnxruntime $ONNXRUNTIME_VERSION has no $RANKD_ONNXRUNTIME_LIB: its layout changed"
  fi

  if ! prom_cached; then
    [ -n "$prom_revision" ] || prom_lookup || tools_fail "no prometheus $PROMETHEUS_VERSION in the package lists"
    echo "== installing prometheus $PROMETHEUS_VERSION (Debian $prom_revision) into $prom_root"
    local dl
    dl="$(mktemp -d)"
    # Lists read before a point release name a revision the archive no
    # longer has: read them again once and take what it serves now.
    if ! (cd "$dl" && apt-get download "prometheus=$prom_revision"); then
      apt_refresh && prom_lookup && (cd "$dl" && apt-get download "prometheus=$prom_revision") || {
        rm -rf "$dl"
        tools_fail "apt-get could not download prometheus $PROMETHEUS_VERSION (above)"
      }
    fi
    rm -rf "$prom_root"
    dpkg-deb -x "$dl"/prometheus_*.deb "$prom_root" || {
      rm -rf "$dl" "$prom_root"
      tools_fail "dpkg-deb could not unpack $(ls "$dl")"
    }
    rm -rf "$dl"
    local bin said
    for bin in "$RANKD_PROMETHEUS" "$RANKD_PROMTOOL"; do
      said="$("$bin" --version 2>&1 | head -n1 || true)"
      # Debian's builds say e.g. "version 2.42.0+ds (branch: ...)".
      if [[ ! "$said" =~ version\ ${PROMETHEUS_VERSION//./\\.}([+ ]|$) ]]; then
        rm -rf "$prom_root"
        tools_fail "$(basename "$bin") from prometheus=$prom_revision does not say version $PROMETHEUS_VERSION: $said"
      fi
    done
  fi

  if ! pytools_cached; then
    echo "== installing the Python tools of $PYTHON_TOOLS into $pytools_root"
    rm -rf "$pytools_root"
    python3 -m pip install --quiet --disable-pip-version-check --target "$pytools_root" -r "$PYTHON_TOOLS" ||
      tools_fail "pip could not install $PYTHON_TOOLS (above)"
    touch "$pytools_root/.complete"
  fi
}
