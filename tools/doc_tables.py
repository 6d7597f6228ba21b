"""Keep the tables in ``docs/*.md`` equal to the results they quote.

    python -m tools.doc_tables            # rewrite every generated block from its source
    python -m tools.doc_tables --check    # list stale blocks (doc, source); exit 1 if any, else 0

A generated block in a doc is delimited by two comment lines naming its source under ``results/``:

    <!-- table: results/compare_cpu/summary.md -->
    ...generated, never edited by hand...
    <!-- end table -->

Its content is taken from the source: for a comparison summary (``results/<dir>/summary.md``, written by
``python -m tools.compare``) its markdown tables; for any other source (``results/plans/table.md``, written
by ``python -m tools.plan_table``) its tables, each with the note paragraph that follows it. Pure python:
no JAX, so it runs anywhere in a second.
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<open><!-- table: (?P<src>results/\S+) -->\n)(?P<body>.*?)(?P<close><!-- end table -->)",
                   re.DOTALL)


def _is_row(line: str) -> bool:
    return line.lstrip().startswith("|")


def source_tables(text: str, with_notes: bool) -> str:
    """The markdown tables of ``text`` (runs of lines starting with '|'), separated by a blank line; with
    ``with_notes``, each followed by the paragraph directly after it (unless that is a heading, list or table)."""
    lines = text.splitlines()
    parts, i = [], 0
    while i < len(lines):
        if not _is_row(lines[i]):
            i += 1
            continue
        j = i
        while j < len(lines) and _is_row(lines[j]):
            j += 1
        part = lines[i:j]
        if with_notes:
            k = j
            while k < len(lines) and not lines[k].strip():
                k += 1
            note = []
            while k < len(lines) and lines[k].strip() and not lines[k].lstrip().startswith(("#", "-", "*", "|")):
                note.append(lines[k])
                k += 1
            if note:
                part += [""] + note
            j = max(j, k)
        parts.append("\n".join(part))
        i = j
    return "\n\n".join(parts)


def generate(src: str, root: Path = ROOT) -> str:
    """The body of a block whose source is ``src`` (a path relative to ``root``, under results/)."""
    path = root / src
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no such file (named by a generated table block)")
    tables = source_tables(path.read_text(encoding="utf-8"), with_notes=path.name != "summary.md")
    if not tables:
        raise ValueError(f"{src}: holds no markdown table")
    return "\n" + tables + "\n\n"


def docs(root: Path = ROOT) -> list[Path]:
    return sorted((root / "docs").glob("*.md"))


def render(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every block regenerated, and the sources of the blocks that changed."""
    stale = []

    def sub(m):
        body = generate(m["src"], root)
        if body != m["body"]:
            stale.append(m["src"])
        return m["open"] + body + m["close"]

    return BLOCK.sub(sub, text), stale


def check(root: Path = ROOT) -> list[tuple[str, str]]:
    """Every stale block as (doc, source), docs relative to ``root``; empty when the docs agree."""
    out = []
    for doc in docs(root):
        _, stale = render(doc.read_text(encoding="utf-8"), root)
        out += [(str(doc.relative_to(root)), src) for src in stale]
    return out


def write(root: Path = ROOT) -> list[tuple[str, str]]:
    """Regenerate every block in place; returns the blocks that changed, as ``check`` does."""
    changed = []
    for doc in docs(root):
        text = doc.read_text(encoding="utf-8")
        new, stale = render(text, root)
        if new != text:
            doc.write_text(new, encoding="utf-8")
        changed += [(str(doc.relative_to(root)), src) for src in stale]
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.doc_tables", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="report stale blocks and exit 1 if any; write nothing")
    p.add_argument("--root", default=str(ROOT), help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    root = Path(args.root)
    try:
        blocks = check(root) if args.check else write(root)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for doc, src in blocks:
            print(f"stale: {doc} (source: {src})")
        if blocks:
            print("run `python -m tools.doc_tables` to regenerate them")
            return 1
        print("docs agree with results/")
        return 0
    for doc, src in blocks:
        print(f"rewrote: {doc} (source: {src})")
    print(f"{len(blocks)} block(s) rewritten" if blocks else "docs agree with results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
