"""The documents' examples, run: every request shown in README.md and docs/
is sent to a real rankd (RANKD_BIN) serving the demo models, and where the
document shows the answer, the daemon's answer must match it.

The convention, in the Markdown:

- A code block that is run carries a marker on the line before it,
  `<!-- example: session NAME -->`. The blocks of one session run in
  document order (README.md first, then docs/ by name) against one daemon
  started fresh for that session, so a later block sees the state an
  earlier one wrote. `sh` blocks are run command by command with bash in
  the daemon's folder (its socket is `./rankd.sock` there), `localhost:8080`
  and `127.0.0.1:8080` standing for the daemon's HTTP address; the line
  `cargo run --release -- serve` is the daemon itself and is not run.
  `python` blocks are run whole with `python3` and must exit 0.
- In an `sh` block, comment lines that hold JSON (`# {...}`) after a command
  are its shown answer: one line per line of output (NDJSON for bulk calls).
  Ids, strings and flags must be equal, numbers equal to the shown precision
  (`0.39` matches 0.39319175), and `...` elides: the rest of a list
  (`[{"id": 1}, ...]`, `[...]`) or of an object's keys (`{"a": 1, ...}`).
  A command without a shown answer must exit 0 and not answer an error.
- Every `sh` block with a `curl` in these documents must carry a marker,
  `<!-- example: not run: WHY -->` for one that cannot run here, so that
  no request is left unchecked by accident; and the blocks listed in
  EXPECTED must be found, so that a marker lost in an edit fails loudly."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("RANKD_BIN", ROOT / "target" / "release" / "rankd"))
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# (session, document, a fragment of a command that shows its answer): the
# examples that must be there.
EXPECTED = [
    ("tour", "README.md", "/v1/models/demo/recommend"),
    ("tour", "README.md", "/v1/users/7"),
    ("try-it", "README.md", "/v1/models/demo/recommend"),
    ("try-it", "README.md", "/v1/models/demo-ranker/score"),
    ("try-it", "docs/http-api.md", "/v1/models/demo/bulk"),
]

MARKER = re.compile(r"^<!-- example: (?:session ([A-Za-z0-9_-]+)|not run: .+) -->$")
FENCE = re.compile(r"^(```|~~~)\s*([A-Za-z0-9_+-]*)\s*$")
DAEMON_LINE = "cargo run --release -- serve"


class Step:
    def __init__(self, doc, line, kind, text):
        self.doc, self.line, self.kind, self.text = doc, line, kind, text
        self.answers = []

    def where(self):
        return f"{self.doc}:{self.line}"


def blocks(path):
    """(line number of the opening fence, language, marker line or None,
    lines) of every fenced code block of a Markdown file."""
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(m.group(1)):
            j += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = before.strip() if before.startswith("<!-- example:") else None
        yield start + 1, lang, marker, lines[start + 1:j]
        i = j + 1


def shell_steps(doc, fence, lines):
    """The commands of an sh block, each with its shown answer lines."""
    first = fence + 1
    steps = []
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if not stripped:
            i += 1
            continue
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith(("{", "[")):
                assert steps, f"{doc}:{first + i}: an answer before any command"
                steps[-1].answers.append(body)
            i += 1
            continue
        start, command = i, [line]
        heredoc = re.search(r"<<-?\s*'?([A-Za-z_]+)'?", line)
        while command[-1].rstrip().endswith("\\"):
            i += 1
            command.append(lines[i])
        if heredoc:
            while lines[i].strip() != heredoc.group(1):
                i += 1
                assert i < len(lines), f"{doc}:{first + start}: the here-document never ends"
                command.append(lines[i])
        steps.append(Step(doc, first + start, "sh", "\n".join(command)))
        i += 1
    return steps


def collect(documents=DOCUMENTS, root=ROOT):
    """{session: [Step, ...]} in running order, and the problems found."""
    sessions, problems = {}, []
    for path in documents:
        doc = str(path.relative_to(root))
        for fence, lang, marker, lines in blocks(path):
            has_curl = any(re.search(r"(^|[\s;|&(])curl\s", l) for l in lines if not l.strip().startswith("#"))
            if marker is None:
                if has_curl and lang in ("sh", "bash", "shell", "console", ""):
                    problems.append(f"{doc}:{fence}: a block with curl and no `<!-- example: ... -->` marker")
                continue
            m = MARKER.match(marker)
            if not m:
                problems.append(f"{doc}:{fence}: a malformed marker {marker!r}")
                continue
            session = m.group(1)
            if session is None:
                continue
            if lang in ("sh", "bash"):
                steps = shell_steps(doc, fence, lines)
            elif lang == "python":
                steps = [Step(doc, fence + 1, "python", "\n".join(lines))]
            else:
                problems.append(f"{doc}:{fence}: an example in a {lang!r} block, which the test cannot run")
                continue
            if not steps:
                problems.append(f"{doc}:{fence}: a marked block with nothing to run")
            sessions.setdefault(session, []).extend(steps)
    return sessions, problems


SESSIONS, PROBLEMS = collect()


# The shown answers.

ELIDED = "\u2026elided\u2026"


def parse_shown(text):
    """A shown answer as JSON, `...` outside strings made a marker, floats
    kept as Decimal so that their shown precision is known."""
    out, i, in_string = [], 0, False
    while i < len(text):
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1])
                i += 2
                continue
            in_string = c != '"'
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("...", i):
            rest = text[i + 3:].lstrip()
            out.append(f'"{ELIDED}": null' if rest.startswith("}") else f'"{ELIDED}"')
            i += 3
            continue
        else:
            out.append(c)
        i += 1
    return json.loads("".join(out), parse_float=Decimal)


def mismatches(shown, actual, path="$"):
    """Where `actual` differs from the shown answer, as a list of strings."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is not an object"]
        keys = [k for k in shown if k != ELIDED]
        bad = [f"{path}: no key {k!r}" for k in keys if k not in actual]
        if ELIDED not in shown:
            bad += [f"{path}: a key not shown, {k!r}" for k in actual if k not in shown]
        for k in keys:
            if k in actual:
                bad += mismatches(shown[k], actual[k], f"{path}.{k}")
        return bad
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return [f"{path}: {actual!r} is not a list"]
        assert ELIDED not in shown[:-1], f"{path}: `...` may only end a list"
        elided = bool(shown) and shown[-1] == ELIDED
        items = shown[:-1] if elided else shown
        if len(actual) < len(items) or (not elided and len(actual) != len(items)):
            return [f"{path}: {len(actual)} elements, {len(items)}{' or more' if elided else ''} shown"]
        bad = []
        for n, (s, a) in enumerate(zip(items, actual)):
            bad += mismatches(s, a, f"{path}[{n}]")
        return bad
    if isinstance(shown, Decimal):
        if isinstance(actual, bool) or not isinstance(actual, (int, float)):
            return [f"{path}: {actual!r} is not a number"]
        places = max(0, -shown.as_tuple().exponent)
        if abs(Decimal(repr(actual)) - shown) > Decimal(5) / Decimal(10) ** (places + 1):
            return [f"{path}: {actual!r} is not {shown} to {places} decimal places"]
        return []
    if isinstance(shown, bool) or shown is None or isinstance(shown, str):
        return [] if type(actual) is type(shown) and actual == shown else [f"{path}: {actual!r}, shown {shown!r}"]
    if isinstance(shown, int):
        ok = not isinstance(actual, bool) and isinstance(actual, (int, float)) and actual == shown
        return [] if ok else [f"{path}: {actual!r}, shown {shown!r}"]
    raise AssertionError(f"{path}: cannot compare {shown!r}")


def test_the_comparison_catches_a_wrong_answer():
    actual = {"model": "demo", "items": [{"id": 47806, "score": 0.52823466}, {"id": 15430, "score": 0.5248}],
              "degraded": False}
    assert mismatches(parse_shown('{"model":"demo","items":[{"id":47806,"score":0.53},...],"degraded":false}'),
                      actual) == []
    assert mismatches(parse_shown('{"items":[...],...}'), actual) == []
    assert mismatches(parse_shown('{"model":"demo","items":[{"id":47806,"score":0.52},...],"degraded":false}'),
                      actual) == ["$.items[0].score: 0.52823466 is not 0.52 to 2 decimal places"]
    assert mismatches(parse_shown('{"model":"demo","items":[{"id":47807,"score":0.53},...],"degraded":false}'),
                      actual) == ["$.items[0].id: 47806, shown 47807"]
    assert mismatches(parse_shown('{"model":"demo","items":[{"id":47806,"score":0.53}],"degraded":false}'),
                      actual) == ["$.items: 2 elements, 1 shown"]
    assert mismatches(parse_shown('{"model":"demo","items":[...]}'), actual) == ["$: a key not shown, 'degraded'"]
    assert mismatches(parse_shown('{"message":"a ... b"}'), {"message": "a ... b"}) == []
    assert mismatches(parse_shown('{"cold_start":true}'), {"cold_start": 1}) == ["$.cold_start: 1, shown True"]
    assert parse_shown("[0.39,0.30,0.18]") == [Decimal("0.39"), Decimal("0.30"), Decimal("0.18")]
    assert mismatches(parse_shown("[0.39,0.30,0.18]"), [0.39319175, 0.30031547, 0.18239264]) == []
    assert mismatches(parse_shown("[0.38,0.29,0.18]"), [0.39319175, 0.30031547, 0.18239264]) == [
        "$[0]: 0.39319175 is not 0.38 to 2 decimal places", "$[1]: 0.30031547 is not 0.29 to 2 decimal places"]


def test_the_extraction_catches_an_unmarked_or_lost_example(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- example: session s -->\n```sh\ncargo run --release -- serve &\n"
        "curl -s localhost:8080/v1/models/demo/recommend \\\n  -d '{\"user_id\": 1}'\n"
        "# prose\n# {\"items\":[...]}\n\ncurl -s localhost:8080/readyz   # no answer shown\n```\n\n"
        "```sh\ncurl -s localhost:8080/metrics\n```\n\n"
        "<!-- example: not run: needs a broker -->\n```sh\ncurl -s localhost:8080/v1/ingest\n```\n\n"
        "<!-- example: session s -->\n```toml\nx = 1\n```\n")
    sessions, problems = collect([doc], tmp_path)
    assert problems == ["doc.md:12: a block with curl and no `<!-- example: ... -->` marker",
                        "doc.md:22: an example in a 'toml' block, which the test cannot run"], problems
    steps = sessions["s"]
    assert [s.text.split("\n")[0] for s in steps] == [
        "cargo run --release -- serve &", "curl -s localhost:8080/v1/models/demo/recommend \\",
        "curl -s localhost:8080/readyz   # no answer shown"]
    assert [s.answers for s in steps] == [[], ['{"items":[...]}'], []]
    assert [s.line for s in steps] == [3, 4, 9]


def test_every_example_is_marked_and_the_expected_ones_are_there():
    assert PROBLEMS == [], "\n".join(PROBLEMS)
    for session, doc, fragment in EXPECTED:
        found = [s for s in SESSIONS.get(session, []) if s.doc == doc and fragment in s.text and s.answers]
        assert found, f"{doc}: no example of session {session!r} runs {fragment} and shows its answer"


# Running them.

def daemon_class():
    """The Python client tests' Daemon (clients/python/tests/conftest.py)."""
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    spec = importlib.util.spec_from_file_location("rankd_client_test_helpers",
                                                  ROOT / "clients" / "python" / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Daemon


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    assert BIN.exists(), f"{BIN} is missing: build it with cargo build --release"
    repo = tmp_path_factory.mktemp("example-models")
    subprocess.run([str(BIN), "models", "generate", "--models", str(repo)], check=True,
                   stdout=subprocess.DEVNULL)
    return repo


def run_shell(step, http, cwd, env):
    command = step.text.replace("localhost:8080", http).replace("127.0.0.1:8080", http)
    for attempt in range(5):
        r = subprocess.run(["bash", "-c", "set -o pipefail\n" + command], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{step.where()}: exit {r.returncode}\n{command}\n{r.stdout}{r.stderr}"
        # A deadline or a full queue on a loaded test machine is no wrong answer: again.
        if not re.match(r'\{"error":\{"type":"(deadline_exceeded|overloaded)"', r.stdout.strip()):
            break
        time.sleep(0.2 * (attempt + 1))
    return r.stdout


@pytest.mark.parametrize("session", sorted(SESSIONS))
def test_the_examples_answer_as_shown(session, demo_models, tmp_path):
    assert shutil.which("curl"), "curl is not on PATH"
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    (workdir / "examples").symlink_to(ROOT / "examples")
    daemon = daemon_class()(demo_models, workdir).start()
    try:
        http = daemon.http.removeprefix("http://")
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python")]
                                             + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        ran = 0
        for step in SESSIONS[session]:
            if step.kind == "python":
                r = subprocess.run([sys.executable, "-c", step.text], cwd=workdir, env=env,
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, f"{step.where()}: the Python example failed\n{r.stdout}{r.stderr}"
                ran += 1
                continue
            if step.text.strip().startswith("cargo run"):
                assert step.text.split("#")[0].strip().rstrip("&").strip() == DAEMON_LINE, step.where()
                continue
            out = run_shell(step, http, workdir, env)
            ran += 1
            lines = [l for l in out.split("\n") if l.strip()]
            if not step.answers:
                for line in lines[:1]:
                    try:
                        answer = json.loads(line)
                    except ValueError:
                        continue
                    error = answer.get("error") if isinstance(answer, dict) else None
                    assert not (isinstance(error, dict) and "type" in error), f"{step.where()}: {line}"
                continue
            assert len(lines) == len(step.answers), (
                f"{step.where()}: {len(lines)} lines answered, {len(step.answers)} shown\n{out}")
            for shown, line in zip(step.answers, lines):
                bad = mismatches(parse_shown(shown), json.loads(line))
                assert bad == [], f"{step.where()}: the answer is not the one shown\nshown:  {shown}\nactual: {line}\n" \
                    + "\n".join(bad)
        assert ran > 0
    finally:
        daemon.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
