"""The documentation's links: every relative Markdown link in README.md,
docs/, benches/ and the READMEs of clients/python/ and docker/ points at a
file that exists and, when it names an anchor (`page.md#section`, or
`#section` in the same page), at a heading of that page, by GitHub's rules
for heading anchors."""

import re
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pages(root=ROOT):
    found = [root / "README.md", root / "clients" / "python" / "README.md", root / "docker" / "README.md"]
    found += sorted((root / "docs").glob("*.md"))
    found += sorted((root / "benches").rglob("*.md"))
    return [p for p in found if p.exists()]


FENCE = re.compile(r"^ {0,3}(```|~~~)")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def slug(heading):
    """GitHub's anchor for a heading's text (github-slugger): the rendered
    text lowercased, every character that is not a letter, mark, number,
    connector (`_`), space or `-` dropped, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = text.lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(text):
    """The anchors of a page: one per heading, a repeated one numbered -1,
    -2, ... in order, and the ids and names of HTML anchors."""
    seen = {}
    found = set()
    for _, line in prose_lines(text):
        m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            a = base if base not in seen else f"{base}-{seen[base]}"
            seen[base] = seen.get(base, 0) + 1
            found.add(a)
        for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", line):
            found.add(m.group(1))
    return found


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text):
    """(line number, target) of every inline link and image outside code."""
    for n, line in prose_lines(text):
        line = re.sub(r"(`+)(.+?)\1", "", line)  # code spans
        for m in LINK.finditer(line):
            yield n, m.group(1)


def dead_links(files, root=ROOT):
    """Every relative link of `files` whose file or anchor does not exist,
    as 'page:line: target (why)'."""
    cache = {}

    def anchors_of(path):
        if path not in cache:
            cache[path] = anchors(path.read_text())
        return cache[path]

    bad = []
    for page in files:
        text = page.read_text()
        for n, target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root) if page.is_relative_to(root) else page}:{n}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md":
                if anchor not in anchors_of(dest):
                    bad.append(f"{where} (no such anchor)")
    return bad


def test_the_pages_are_found():
    names = {str(p.relative_to(ROOT)) for p in pages()}
    for want in ("README.md", "docs/architecture.md", "docs/configuration.md", "docs/http-api.md",
                 "docs/protocol.md", "docs/models.md", "docs/kafka.md", "docs/operations.md",
                 "docs/metrics.md", "benches/RESULTS.md"):
        assert want in names, want


def test_no_dead_links_or_anchors():
    files = pages()
    assert sum(1 for p in files for _ in links(p.read_text())) > 50, "too few links found: the parser broke"
    bad = dead_links(files)
    assert bad == [], "dead links:\n" + "\n".join(bad)


def test_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    targets = {t.partition("#")[0] for _, t in links(readme)}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in targets, f"README.md does not link docs/{page.name}"
    assert "benches/RESULTS.md" in targets


def test_slugs_follow_github():
    assert slug("Batching, priorities and shedding") == "batching-priorities-and-shedding"
    assert slug("`cpu_scoring = \"exact-int8\"`") == "cpu_scoring--exact-int8"
    assert slug("1. Enabling the socket") == "1-enabling-the-socket"
    assert slug("Observability: alerts, dashboard, runbook") == "observability-alerts-dashboard-runbook"
    assert slug("The `sasrec` kind") == "the-sasrec-kind"
    assert slug("Slow, idle and too many clients") == "slow-idle-and-too-many-clients"
    assert slug("`recommend`: the top `k` items for a user (`POST /v1/models/{model}/recommend`)") == \
        "recommend-the-top-k-items-for-a-user-post-v1modelsmodelrecommend"
    assert anchors("# A\n## A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some section\n\n## Some section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#some-section) [fine too](other.md#some-section-1) [here](#page)\n"
        "[gone](missing.md) and [no anchor](other.md#no-such-section)\n"
        "[not here](#nowhere) ![no image](img/none.svg) [web](https://example.com/x#y)\n"
        "`[in code](ignored.md)`\n\n```\n[in a block](ignored.md)\n```\n")
    bad = dead_links([page], root=tmp_path)
    assert bad == [
        "page.md:4: missing.md (no such file)",
        "page.md:4: other.md#no-such-section (no such anchor)",
        "page.md:5: #nowhere (no such anchor)",
        "page.md:5: img/none.svg (no such file)",
    ], bad


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
