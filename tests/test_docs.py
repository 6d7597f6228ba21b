"""The documentation: generated tables agree with results/, and every relative link resolves."""
import re
import shutil
from pathlib import Path

import pytest

from tools import doc_tables

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(path: Path):
    """The lines of a markdown file outside fenced code blocks, with inline code spans removed."""
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, keep letters, digits, spaces, hyphens and underscores,
    spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def doc_files():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_slug_rule():
    assert slug("Celo2 as deployed") == "celo2-as-deployed"
    assert slug("`tools.bench`: the --config form") == "toolsbench-the---config-form"
    assert slug("CPU, 2026-12-01: the 50% target") == "cpu-2026-12-01-the-50-target"


def test_docs_agree_with_results():
    assert doc_tables.check(ROOT) == []
    # every generated block names a source that exists, and there is at least one per results/ summary
    text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    for src in sorted(ROOT.glob("results/*/summary.md")) + [ROOT / "results/plans/table.md"]:
        assert f"<!-- table: {src.relative_to(ROOT)} -->" in text, src


def test_an_edited_result_makes_the_check_fail_and_the_write_fixes_it(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "results", tmp_path / "results")
    assert doc_tables.check(tmp_path) == []
    summary = tmp_path / "results/compare_cpu/summary.md"
    text = summary.read_text(encoding="utf-8")
    assert "4.7807" in text
    summary.write_text(text.replace("4.7807", "4.7808"), encoding="utf-8")
    stale = doc_tables.check(tmp_path)
    assert stale and all(src == "results/compare_cpu/summary.md" for _, src in stale)
    assert doc_tables.main(["--check", "--root", str(tmp_path)]) == 1
    assert doc_tables.write(tmp_path) == stale
    assert doc_tables.check(tmp_path) == []
    assert doc_tables.main(["--check", "--root", str(tmp_path)]) == 0
    assert "4.7808" in (tmp_path / "docs/results.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    bad = []
    for line in _prose_lines(doc):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists() or ROOT not in [dest, *dest.parents]:
                bad.append(f"{target}: no such file in the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{target}: {dest.name} has no heading with the anchor #{anchor}")
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)
