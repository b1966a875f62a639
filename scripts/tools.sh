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
# - Prometheus and promtool (Debian's package, unpacked without root): the
#   upstream version only. The archive replaces Debian revisions (a binary
#   rebuild `+b6` became the point release `+deb12u1`), so the revision is
#   whatever the archive serves for that upstream version, and the unpacked
#   binaries' own `--version` is checked instead.
# - The Python tools (scripts/python-tools.txt, hadolint among them): exact
#   versions, cached per hash of that file.

TANSU_VERSION=0.6.0
NVRTC_VERSION=13.0.88
PROMETHEUS_VERSION=2.42.0
PYTHON_TOOLS=scripts/python-tools.txt

tools="${RANKD_TOOLS:-$HOME/.cache/rankd/tools}"
tansu_root="$tools/tansu-$TANSU_VERSION"
nvrtc_root="$tools/nvrtc-$NVRTC_VERSION"
prom_root="$tools/prometheus-$PROMETHEUS_VERSION"
pytools_root="$tools/python-$(sha256sum "$PYTHON_TOOLS" | cut -c1-12)"

export RANKD_TANSU="$tansu_root/bin/tansu"
export RANKD_NVRTC_LIB="$nvrtc_root/nvidia/cu13/lib"
export RANKD_PROMETHEUS="$prom_root/usr/bin/prometheus"
export RANKD_PROMTOOL="$prom_root/usr/bin/promtool"

tools_fail() {
  echo "error: $*" >&2
  exit 1
}

tansu_cached() { [ -x "$RANKD_TANSU" ]; }
nvrtc_cached() { [ -f "$RANKD_NVRTC_LIB/libnvrtc.so.13" ]; }
prom_cached() { [ -x "$RANKD_PROMETHEUS" ] && [ -x "$RANKD_PROMTOOL" ]; }
pytools_cached() { [ -f "$pytools_root/.complete" ]; }

# crates.io's sparse index: one JSON line per published version.
tansu_available() {
  local index
  index="$(curl -fsS --max-time 20 https://index.crates.io/ta/ns/tansu)" ||
    tools_fail "could not read crates.io's index for tansu (https://index.crates.io/ta/ns/tansu); is crates.io reachable?"
  python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    v = json.loads(line)
    if v["vers"] == want:
        sys.exit(2 if v["yanked"] else 0)
sys.exit(1)' "$TANSU_VERSION" <<<"$index" && return 0
  case $? in
    2) tools_fail "tansu $TANSU_VERSION is yanked on crates.io: pick another version (TANSU_VERSION in scripts/tools.sh) and check the broker tests with it" ;;
    *) tools_fail "tansu $TANSU_VERSION is not on crates.io: pick a published version (TANSU_VERSION in scripts/tools.sh)" ;;
  esac
}

# The versions pip's own index (pip.conf and PIP_* honoured) lists for a package.
pypi_has() {
  local name="$1" version="$2" out
  out="$(python3 -m pip index versions --disable-pip-version-check "$name" 2>/dev/null)" ||
    return 2
  sed -n 's/^Available versions: //p' <<<"$out" | tr ',' '\n' | tr -d ' ' | grep -qxF "$version"
}

nvrtc_available() {
  local rc=0
  pypi_has nvidia-cuda-nvrtc "$NVRTC_VERSION" || rc=$?
  case $rc in
    0) ;;
    2) tools_fail "could not list nvidia-cuda-nvrtc's versions on the Python package index pip uses; is it reachable?" ;;
    *) tools_fail "nvidia-cuda-nvrtc $NVRTC_VERSION is not on the Python package index pip uses: pick a listed 13.0.x version (NVRTC_VERSION in scripts/tools.sh; 'python3 -m pip index versions nvidia-cuda-nvrtc')" ;;
  esac
}

# Debian's archive: the revision it serves today for the pinned upstream version.
# Reads the package lists afresh, since stale lists name revisions the archive
# no longer has.
prom_revision=""
prom_available() {
  apt-get update -qq >/dev/null 2>&1 ||
    tools_fail "apt-get update failed: Prometheus comes from Debian's archive (as root, check /etc/apt/sources.list*)"
  prom_revision="$(apt-cache madison prometheus | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    grep -E "^${PROMETHEUS_VERSION//./\\.}\+" | head -n1 || true)"
  [ -n "$prom_revision" ] ||
    tools_fail "Debian's archive has no prometheus $PROMETHEUS_VERSION any more (it serves: $(apt-cache madison prometheus | awk -F'|' '{print $2}' | xargs)); pin one of those (PROMETHEUS_VERSION in scripts/tools.sh) and run the monitoring tests"
}

pytools_available() {
  local missing="" req name version pids=() dir
  dir="$(mktemp -d)"
  while read -r req; do
    req="${req%%#*}"
    req="$(xargs <<<"$req")"
    [ -n "$req" ] || continue
    name="${req%%==*}"
    version="${req#*==}"
    [ "$name" != "$req" ] || tools_fail "$PYTHON_TOOLS: '$req' is not pinned with =="
    (
      rc=0
      pypi_has "$name" "$version" || rc=$?
      case $rc in
        0) ;;
        2) echo "$name==$version (index not reachable)" >"$dir/$name" ;;
        *) echo "$name==$version" >"$dir/$name" ;;
      esac
    ) &
    pids+=($!)
  done <"$PYTHON_TOOLS"
  wait "${pids[@]}"
  missing="$(cat "$dir"/* 2>/dev/null | xargs || true)"
  rm -rf "$dir"
  [ -z "$missing" ] ||
    tools_fail "not on the Python package index pip uses: $missing (pins in $PYTHON_TOOLS; 'python3 -m pip index versions NAME' lists what is there)"
}

# What will be installed and whether it still can be, before anything long runs.
tools_plan() {
  echo "== tools (cached by version under $tools)"
  if tansu_cached; then echo "   tansu $TANSU_VERSION (crates.io): cached"; else
    tansu_available
    echo "   tansu $TANSU_VERSION (crates.io): to install, available (cargo install, about 9 minutes on 2 cores)"
  fi
  if nvrtc_cached; then echo "   NVRTC $NVRTC_VERSION (PyPI nvidia-cuda-nvrtc): cached"; else
    nvrtc_available
    echo "   NVRTC $NVRTC_VERSION (PyPI nvidia-cuda-nvrtc): to install, available"
  fi
  if prom_cached; then echo "   prometheus $PROMETHEUS_VERSION (Debian): cached"; else
    prom_available
    echo "   prometheus $PROMETHEUS_VERSION (Debian): to install, available as $prom_revision"
  fi
  if pytools_cached; then echo "   Python tools of $PYTHON_TOOLS: cached"; else
    pytools_available
    echo "   Python tools of $PYTHON_TOOLS: to install, every pin available"
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

  if ! prom_cached; then
    [ -n "$prom_revision" ] || prom_available
    echo "== installing prometheus $PROMETHEUS_VERSION (Debian $prom_revision) into $prom_root"
    local dl
    dl="$(mktemp -d)"
    (cd "$dl" && apt-get download "prometheus=$prom_revision") ||
      tools_fail "apt-get could not download prometheus=$prom_revision (above)"
    rm -rf "$prom_root"
    dpkg-deb -x "$dl"/prometheus_*.deb "$prom_root"
    rm -rf "$dl"
    local bin
    for bin in "$RANKD_PROMETHEUS" "$RANKD_PROMTOOL"; do
      "$bin" --version 2>&1 | grep -q "version $PROMETHEUS_VERSION\b" || {
        rm -rf "$prom_root"
        tools_fail "$(basename "$bin") from prometheus=$prom_revision does not say version $PROMETHEUS_VERSION: $("$bin" --version 2>&1 | head -n1)"
      }
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
