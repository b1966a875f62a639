#!/usr/bin/env bash
# Rewrites the configuration reference in docs/configuration.md (the block between the
# config-reference markers) from `rankd config-reference`, i.e. from the CLI's
# own definitions. RANKD_BIN: the rankd to ask (default: a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${RANKD_BIN:-target/release/rankd}"
[ -x "$bin" ] || cargo build --release --locked --bin rankd
table="$("$bin" config-reference)"
python3 - "$table" <<'PY'
import sys
begin = "<!-- config-reference:begin (scripts/config-reference.sh rewrites this block) -->"
end = "<!-- config-reference:end -->"
text = open("docs/configuration.md").read()
assert begin in text and end in text, "docs/configuration.md has no config-reference markers"
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open("docs/configuration.md", "w").write(head + begin + "\n" + sys.argv[1].strip("\n") + "\n" + end + tail)
PY
echo "docs/configuration.md: configuration reference rewritten"
