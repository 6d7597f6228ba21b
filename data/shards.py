"""One work unit of a preparation: documents -> held-out choice -> tokens -> size-bounded ArrayRecord shards.

This is the whole per-unit computation, the same under the local worker pool (``data.prepare``) and
Apache Beam (``data.beam``), so both write identical files. For unit ``u`` it writes, inside the data dir:

  <split>/u<u:06d>-<p:04d>.array_record   part p of the unit's stream of each split (split: train, eval)
  units/<u:06d>.counts.npy                 how often each token id occurs in the unit's training tokens
  units/<u:06d>.json                       the unit's manifest, written last: its presence marks it done

A split's stream within the unit is its documents in input order, each as ``[BOS] + tokens`` (BOS: the
tokenizer's document boundary, ``data.tokenizer``). A part is
closed at the first document boundary at or after ``shard_tokens`` tokens (so parts hold about
``shard_tokens`` tokens, never zero); record ``i`` of a part holds its tokens ``[i * chunk_size, (i + 1) *
chunk_size)`` as raw little-endian ``uint16``/``uint32``. Every file is written under a temporary name and
renamed when complete, so a killed unit leaves no file that looks finished; it is redone from scratch. A data
dir on object storage (``gs://...``) gets the same objects: a part is written to a local temporary file (the
ArrayRecord writer needs one; in ``$TMPDIR``) and uploaded as one object when complete, which appears whole or
not at all, and the other files are uploaded whole (``infra.files``).

A document is held out for evaluation when ``sha256(id)``, read as a fraction in [0, 1), is below
``eval_fraction``: a deterministic choice of whole documents that needs no pass over the corpus (a corpus
small enough to scan moves some documents across it, see ``data.prepare.flipped_documents``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import resource
import tempfile
import time
from typing import Callable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data import corpus as corpus_lib
from data.tokenizer import load_tokenizer
from infra.files import is_uri, join, makedirs, open_binary, read_text, upload, write_atomic

SPLITS = ("train", "eval")
UNITS_DIR = "units"
_WRITER_OPTIONS = "group_size:1,uncompressed"  # group_size 1: grain's random access reads one record
_ENCODE_CHARS = 1 << 20  # documents are encoded in batches of about this many characters
_PROGRESS_BYTES = 4 << 20


def doc_hash(doc_id: str) -> float:
    """The first 64 bits of ``sha256(id)`` as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def held_out(doc_id: str, eval_fraction: float, flipped: tuple[str, ...] = ()) -> bool:
    """Whether document ``doc_id`` belongs to the eval split: ``doc_hash(id) < eval_fraction``, except for
    the ``flipped`` documents (``data.prepare.flipped_documents``, for a corpus small enough to scan)."""
    return (doc_hash(doc_id) < eval_fraction) != (doc_id in flipped)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class UnitJob:
    """What every unit of one preparation shares (picklable: it travels to worker processes)."""
    out: str  # the data dir being written (a local path or a URI)
    tokenizer: str  # the tokenizer file (a local path or a URI; its kind by its name, data.tokenizer)
    eval_fraction: float
    chunk_size: int
    shard_tokens: int
    text_key: str
    on_error: str
    flipped: tuple[str, ...] = ()  # documents on the other side of the held-out rule
    tokenizer_options: dict = dataclasses.field(default_factory=dict, hash=False)  # data.tokenizer.options_of


def manifest_path(out: str, index: int) -> str:
    return join(out, UNITS_DIR, f"{index:06d}.json")


def counts_path(out: str, index: int) -> str:
    return join(out, UNITS_DIR, f"{index:06d}.counts.npy")


def read_manifest(out: str, index: int) -> dict | None:
    """The manifest of a finished unit, or None if the unit is not done."""
    try:
        return json.loads(read_text(manifest_path(out, index)))
    except FileNotFoundError:
        return None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _PartWriter:
    """The parts of one split of one unit: records of chunk_size tokens, a new part every ~shard_tokens."""

    def __init__(self, out: str, split: str, unit: int, chunk_size: int, shard_tokens: int, dtype: np.dtype):
        self._out, self._split, self._unit = out, split, unit
        self._chunk, self._shard_tokens, self._dtype = chunk_size, shard_tokens, dtype
        self.parts: list[dict] = []
        self._writer = None
        self._tmp = None  # the file the current part is written to until it is complete
        self._buf = np.empty(chunk_size, dtype)
        self._fill = self._part_tokens = self._part_chunks = 0

    def _name(self) -> str:
        return f"{self._split}/u{self._unit:06d}-{len(self.parts):04d}.array_record"

    def _temporary(self) -> str:
        """Where the current part is written until it is complete: next to it on a local disk (then renamed),
        a local temporary file for a data dir on object storage (then uploaded)."""
        if is_uri(self._out):
            fd, path = tempfile.mkstemp(prefix=f"celo2-{self._split}-u{self._unit:06d}-", suffix=".array_record")
            os.close(fd)
            return path
        os.makedirs(os.path.join(self._out, self._split), exist_ok=True)
        return os.path.join(self._out, self._name()) + ".tmp"

    def write_document(self, ids: np.ndarray, end: bool = True) -> None:
        """Append a document's ids (or, with ``end`` False, the first ones of a document continued by the next
        call); a part is closed only where a document ends."""
        if self._writer is None:
            self._tmp = self._temporary()
            self._writer = ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
        self._part_tokens += len(ids)
        while len(ids):
            take = min(self._chunk - self._fill, len(ids))
            self._buf[self._fill:self._fill + take] = ids[:take]
            self._fill += take
            ids = ids[take:]
            if self._fill == self._chunk:
                self._flush()
        if end and self._part_tokens >= self._shard_tokens:
            self.close()

    def _flush(self) -> None:
        self._writer.write(self._buf[:self._fill].tobytes())
        self._part_chunks += 1
        self._fill = 0

    def close(self) -> None:
        if self._writer is None:
            return
        if self._fill:
            self._flush()
        self._writer.close()
        self._writer = None
        name = self._name()
        final, digest = join(self._out, name), sha256_file(self._tmp)
        if is_uri(final):
            upload(self._tmp, final)  # one object, complete or absent
            os.remove(self._tmp)
        else:
            os.replace(self._tmp, final)
        self.parts.append({"file": name, "n_tokens": self._part_tokens, "n_chunks": self._part_chunks,
                           "sha256": digest})
        self._part_tokens, self._part_chunks = 0, 0

    def discard(self) -> None:
        """Drops the part being written, if any (the unit failed): its temporary file is removed, also when the
        writer cannot close it (a full disk fails its last flush again: that error is the one already raised)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception:  # noqa: BLE001 - the part is dropped whatever its writer says (the first error is raised)
            pass
        finally:
            if self._tmp is not None and os.path.exists(self._tmp):
                os.remove(self._tmp)


def prepare_unit(job: UnitJob, unit: corpus_lib.Unit, progress: Callable[[int], None] | None = None) -> dict:
    """Writes unit ``unit`` (see the module docstring) and returns its manifest."""
    t0 = time.perf_counter()
    tok = load_tokenizer(job.tokenizer, **job.tokenizer_options)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _PartWriter(job.out, s, unit.index, job.chunk_size, job.shard_tokens, dtype) for s in SPLITS}
    stats = {s: {"n_docs": 0, "n_chars": 0, "n_bytes": 0, "ids": hashlib.sha256()} for s in SPLITS}
    counts, problems = np.zeros(tok.vocab_size, np.int64), corpus_lib.Problems(job.on_error)
    bos = np.array([tok.bos_id], dtype)
    pending, pending_chars, reported = [], 0, 0

    def write(ids, split: str, end: bool = True) -> None:
        ids = np.asarray(ids, dtype)
        writers[split].write_document(ids, end)
        if split == "train":
            np.add(counts, np.bincount(ids, minlength=tok.vocab_size), out=counts)

    def encode_pending():
        """The pending documents in one batch; a document longer than a batch (it comes last: it filled the
        batch) in pieces of a batch's size, so that no document needs more memory than a batch."""
        long = pending.pop() if pending and len(pending[-1][0].text) > _ENCODE_CHARS else None
        for (doc, split), ids in zip(pending, tok.encode_batch([d.text for d, _ in pending], num_threads=1)):
            write(np.concatenate([bos, np.asarray(ids, dtype)]), split)
        if long is not None:
            doc, split = long
            write(bos, split, end=False)
            pieces = tok.encode_pieces(doc.text, _ENCODE_CHARS)
            ids = next(pieces)
            for following in pieces:
                write(ids, split, end=False)
                ids = following
            write(ids, split)
        pending.clear()

    try:
        for doc, position in corpus_lib.read_documents(unit, job.text_key, problems):
            split = "eval" if held_out(doc.name, job.eval_fraction, job.flipped) else "train"
            s = stats[split]
            s["n_docs"] += 1
            s["n_chars"], s["n_bytes"] = s["n_chars"] + len(doc.text), s["n_bytes"] + len(doc.text.encode())
            s["ids"].update(doc.name.encode() + b"\n")
            pending.append((doc, split))
            pending_chars += len(doc.text)
            if pending_chars >= _ENCODE_CHARS:
                encode_pending()
                pending_chars = 0
            if progress is not None and position - reported >= _PROGRESS_BYTES:
                progress(position - reported)
                reported = position
        encode_pending()
        for w in writers.values():
            w.close()
    finally:
        for w in writers.values():
            w.discard()  # (after an error: no temporary file is left behind)
    if progress is not None:
        progress(unit.size - reported)

    return _write_manifest(job, unit, writers, stats, counts, problems, time.perf_counter() - t0)


def _write_manifest(job: UnitJob, unit: corpus_lib.Unit, writers: dict, stats: dict, counts, problems,
                    seconds: float) -> dict:
    """Write a finished unit's token counts and its manifest (the last file: a unit with a manifest is done)."""
    manifest = {
        "unit": unit.index,
        "inputs": [f.name for f in unit.files],
        "input_bytes": unit.size,
        "splits": {s: {"parts": writers[s].parts, "n_tokens": sum(p["n_tokens"] for p in writers[s].parts),
                       "n_docs": stats[s]["n_docs"], "n_chars": stats[s]["n_chars"],
                       "n_bytes": stats[s]["n_bytes"],
                       "ids_sha256": stats[s]["ids"].hexdigest()} for s in SPLITS},
        "empty_documents": problems.empty_documents,
        "problems": {"count": problems.count, "examples": problems.examples},
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    makedirs(join(job.out, UNITS_DIR))
    buf = io.BytesIO()
    np.save(buf, counts)
    write_atomic(counts_path(job.out, unit.index), buf.getvalue())
    write_atomic(manifest_path(job.out, unit.index), json.dumps(manifest, indent=1).encode())
    return manifest
