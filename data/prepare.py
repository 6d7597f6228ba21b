"""Corpus preparation: documents -> train/eval split -> tokenizer -> ArrayRecord token chunks + meta.json.

A prepared data dir holds::

  train.array_record   the training token stream, in records of ``chunk_size`` tokens (the last one shorter)
  eval.array_record    the held-out token stream, same layout
  tokenizer.model      the sentencepiece model
  meta.json            written last; its presence marks the dir as complete

Each split's token stream is the concatenation of its documents, each as ``[BOS] + tokens`` (no EOS).
Record ``i`` holds tokens ``[i * chunk_size, (i + 1) * chunk_size)`` of the stream as raw little-endian
``uint16`` (vocab <= 65536) or ``uint32``. Whole documents are held out for evaluation (a deterministic
choice by a hash of the document name, about ``eval_fraction`` of the text), so the eval split never
shares a token with the training split. The tokenizer is trained on the training documents only.

Everything is written to a temporary sibling directory that is renamed into place at the end, so an
interrupted preparation never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
import uuid
from typing import Any, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm.auto import tqdm

from data import corpus as corpus_lib
from data.tokenizer import TRAINER_SEED, TRAINER_SETTINGS, Tokenizer

FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "eval")
_OUR_FILES = {META, TOKENIZER, *(f"{s}.array_record" for s in SPLITS)}
_WRITER_OPTIONS = "group_size:1,uncompressed"  # group_size 1: grain's random access reads one record


def _prepare_hint(data_dir) -> str:
    return f"run `python -m data prepare --corpus <shakespeare|PATH> --out {data_dir}`"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a complete prepared data dir holds (parsed from its meta.json)."""
    data_dir: str
    corpus: str
    vocab_size: int
    bos_id: int
    eos_id: int
    dtype: str  # of the stored tokens: "uint16" or "uint32"
    chunk_size: int  # tokens per ArrayRecord record
    n_tokens: dict[str, int]  # per split, BOS tokens included
    n_docs: dict[str, int]
    unigram_entropy_nats: float  # of the training tokens: the loss of the best context-free model
    meta: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    def files(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [os.path.join(self.data_dir, f) for f in self.meta["splits"][split]["files"]]

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, self.meta["tokenizer"]["file"])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_path)

    @property
    def identity(self) -> str:
        """A short hash of what makes the batches of step k what they are: tokenizer, chunking and the
        documents of every split (not the directory's path)."""
        m = self.meta
        key = {"tokenizer": m.get("tokenizer", {}).get("sha256"), "chunk_size": m.get("chunk_size"),
               "dtype": m.get("dtype"), "splits": {s: {k: v.get(k) for k in ("n_tokens", "n_chunks", "documents")}
                                                   for s, v in m.get("splits", {}).items()}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_meta(cls, data_dir: str | os.PathLike, meta: dict[str, Any]) -> "DatasetInfo":
        splits = meta["splits"]
        return cls(
            data_dir=os.path.abspath(data_dir),
            corpus=str(meta["corpus"]),
            vocab_size=int(meta["vocab_size"]),
            bos_id=int(meta["bos_id"]),
            eos_id=int(meta["eos_id"]),
            dtype=str(np.dtype(meta["dtype"])),
            chunk_size=int(meta["chunk_size"]),
            n_tokens={s: int(splits[s]["n_tokens"]) for s in SPLITS},
            n_docs={s: int(splits[s]["n_docs"]) for s in SPLITS},
            unigram_entropy_nats=float(meta["unigram_entropy_nats"]),
            meta=meta,
        )


def load_info(data_dir: str | os.PathLike) -> DatasetInfo:
    """Reads a complete prepared data dir; ValueError (saying how to prepare it) if missing or corrupt."""
    path = pathlib.Path(data_dir)
    if not path.is_dir():
        raise ValueError(f"no prepared data dir at {path}: {_prepare_hint(path)}")
    meta_path = path / META
    if not meta_path.is_file() and (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        try:
            data_dir = json.loads((path / "config.json").read_text())["data"]["dir"]
        except (ValueError, KeyError, TypeError):
            data_dir = "the data.dir in its config.json"
        raise ValueError(f"{path} is a training run's workdir, not a prepared data dir; its data is {data_dir}")
    if not meta_path.is_file():
        raise ValueError(
            f"{path} is not a complete prepared data dir (no {META}: its preparation never finished). "
            f"Delete it and {_prepare_hint(path)}")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        info = DatasetInfo.from_meta(path, meta)
        missing = [f for s in SPLITS for f in info.files(s) if not os.path.isfile(f)]
        if not os.path.isfile(info.tokenizer_path):
            missing.append(info.tokenizer_path)
        if missing:
            raise ValueError(f"missing files {missing}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"corrupt prepared data dir {path} ({e}). Delete it and {_prepare_hint(path)}") from e
    return info


def split_documents(docs: Sequence[corpus_lib.Document], eval_fraction: float):
    """Whole documents for eval: in order of sha256(name), each one that brings the held-out share of
    characters closer to eval_fraction (always at least one; at least one stays for training)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(docs) < 2:
        raise ValueError(
            f"the corpus has {len(docs)} document(s); holding out whole documents for evaluation needs at "
            "least 2 (use a directory of several .txt files, or separate documents with <|endoftext|> lines)")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    target = eval_fraction * sum(len(d.text) for d in docs)
    held_out, size = set(), 0
    for d in sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest()):
        if size >= target or len(held_out) == len(docs) - 1:
            break
        if held_out and abs(size + len(d.text) - target) >= target - size:
            continue  # taking it would land further from the target than stopping here; try the next one
        held_out.add(d.name)
        size += len(d.text)
    return [d for d in docs if d.name not in held_out], [d for d in docs if d.name in held_out]


class _ChunkWriter:
    """Writes a token stream as ArrayRecord records of chunk_size tokens."""

    def __init__(self, path: pathlib.Path, chunk_size: int, dtype: np.dtype):
        self._writer = ArrayRecordWriter(str(path), _WRITER_OPTIONS)
        self._buf = np.empty(chunk_size, dtype)
        self._fill = 0
        self.n_tokens = 0
        self.n_chunks = 0

    def write(self, ids: np.ndarray) -> None:
        self.n_tokens += len(ids)
        while len(ids):
            take = min(len(self._buf) - self._fill, len(ids))
            self._buf[self._fill:self._fill + take] = ids[:take]
            self._fill += take
            ids = ids[take:]
            if self._fill == len(self._buf):
                self._flush()

    def _flush(self) -> None:
        self._writer.write(self._buf[:self._fill].tobytes())
        self.n_chunks += 1
        self._fill = 0

    def close(self) -> None:
        if self._fill:
            self._flush()
        self._writer.close()


def _write_split(tok: Tokenizer, docs, path: pathlib.Path, chunk_size: int, dtype, vocab_size: int,
                 desc: str, verbose: bool):
    writer = _ChunkWriter(path, chunk_size, dtype)
    counts = np.zeros(vocab_size, np.int64)
    bos = np.array([tok.bos_id], dtype)
    with tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True, desc=desc,
              disable=not verbose) as bar:
        for start in range(0, len(docs), 16):  # a few documents at a time, encoded on several threads
            batch = docs[start:start + 16]
            for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                ids = np.concatenate([bos, np.asarray(ids, dtype)])
                writer.write(ids)
                counts += np.bincount(ids, minlength=vocab_size)
                bar.update(len(d.text))
    writer.close()
    return writer, counts


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def prepare_corpus(
    data_dir: str | os.PathLike,
    corpus: str | os.PathLike = corpus_lib.SHAKESPEARE,
    vocab_size: int | None = 4096,
    *,
    tokenizer: str | os.PathLike | None = None,
    eval_fraction: float = 0.05,
    chunk_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> DatasetInfo:
    """Prepares ``corpus`` into ``data_dir`` (see the module docstring) and returns its info.

    Trains a ``vocab_size`` BPE tokenizer on the training documents, or uses the sentencepiece model file
    ``tokenizer`` (whose size then defines the vocabulary; ``vocab_size`` is ignored). An existing complete ``data_dir``
    is an error unless ``overwrite``; prefer ``ensure_prepared``, which reuses it and locks.
    """
    t0 = time.time()
    out = pathlib.Path(data_dir).absolute()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if (out / META).exists() and not overwrite:
        raise ValueError(f"{out} is already prepared; use ensure_prepared() (or --force to redo it)")
    if out.exists() and not (out / META).exists():
        _check_removable(out)
    docs = corpus_lib.load_documents(corpus, cache_dir)
    train_docs, eval_docs = split_documents(docs, eval_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
            tok = Tokenizer(tmp / TOKENIZER)
            if tok.bos_id < 0:
                raise ValueError(f"tokenizer {tokenizer} defines no BOS id; train it with bos_id >= 0")
            tok_meta = {"file": TOKENIZER, "source": os.path.abspath(tokenizer), "sha256": _sha256(tokenizer)}
        else:
            if vocab_size is None:
                raise ValueError("give vocab_size (to train a tokenizer) or tokenizer (a .model file)")
            if verbose:
                print(f"training a {vocab_size}-token BPE tokenizer on {len(train_docs)} documents ...", flush=True)
            tok = Tokenizer.train((d.text for d in train_docs), tmp / TOKENIZER, vocab_size)
            tok_meta = {"file": TOKENIZER, "source": "trained", "sha256": _sha256(tmp / TOKENIZER),
                        "settings": {**TRAINER_SETTINGS, "vocab_size": vocab_size, "seed": TRAINER_SEED}}
        vocab = tok.vocab_size
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

        splits, counts = {}, {}
        for split, split_docs in (("train", train_docs), ("eval", eval_docs)):
            fname = f"{split}.array_record"
            writer, counts[split] = _write_split(tok, split_docs, tmp / fname, chunk_size, dtype, vocab,
                                                 f"tokenizing {split}", verbose)
            splits[split] = {"files": [fname], "n_tokens": writer.n_tokens, "n_chunks": writer.n_chunks,
                             "n_docs": len(split_docs), "n_chars": sum(len(d.text) for d in split_docs),
                             "documents": [d.name for d in split_docs]}
        assert not set(splits["train"]["documents"]) & set(splits["eval"]["documents"])
        meta = {
            "format_version": FORMAT_VERSION,
            "corpus": corpus_lib.canonical_corpus(corpus),
            "vocab_size": vocab,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "unk_id": tok.unk_id,
            "dtype": dtype.name,
            "chunk_size": chunk_size,
            "eval_fraction": eval_fraction,
            "layout": "each split: documents as [BOS]+tokens, concatenated; record i = tokens "
                      "[i*chunk_size, (i+1)*chunk_size) as raw little-endian dtype",
            "splits": splits,
            "tokenizer": tok_meta,
            "unigram_entropy_nats": _entropy_nats(counts["train"]),
            "prepare_seconds": round(time.time() - t0, 2),
            "created_unix": int(time.time()),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _install(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info = load_info(out)
    if verbose:
        _print_summary(info)
    return info


def _print_summary(info: DatasetInfo) -> None:
    m = info.meta
    print(f"prepared {info.corpus} into {info.data_dir} in {m['prepare_seconds']:.1f} s: vocab {info.vocab_size} "
          f"({'trained BPE' if m['tokenizer']['source'] == 'trained' else m['tokenizer']['source']}), "
          f"{info.dtype}, {info.chunk_size} tokens per record")
    for s in SPLITS:
        sm = m["splits"][s]
        print(f"  {s:5s}: {sm['n_docs']:6d} docs, {sm['n_chars']:12,d} chars, {sm['n_tokens']:12,d} tokens "
              f"({sm['n_chars'] / max(sm['n_tokens'], 1):.2f} chars/token)")
    print(f"  unigram entropy of the training tokens: {info.unigram_entropy_nats:.4f} nats "
          f"(the loss of a model that ignores context; uniform would be {math.log(info.vocab_size):.4f})")


def _check_removable(out: pathlib.Path) -> None:
    """An incomplete dir is replaced only if it holds nothing but files this module writes."""
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUR_FILES)
    if foreign:
        raise ValueError(f"{out} is not a complete prepared data dir and holds other files ({foreign[:5]}); "
                         "empty it or choose another --out")


def _install(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    if (out / META).exists():
        if not overwrite:
            raise ValueError(f"{out} was prepared concurrently by another process; use ensure_prepared()")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            _check_removable(out)
            shutil.rmtree(out)
        os.rename(tmp, out)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path, verbose: bool):
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"waiting for another process to finish preparing (lock {path}) ...", flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_matches(info: DatasetInfo, corpus, vocab_size, tokenizer, eval_fraction) -> None:
    want, have = {}, {}
    if corpus_lib.canonical_corpus(corpus) != info.corpus:
        want["corpus"], have["corpus"] = corpus_lib.canonical_corpus(corpus), info.corpus
    if tokenizer is not None:
        if _sha256(tokenizer) != info.meta["tokenizer"]["sha256"]:
            want["tokenizer"], have["tokenizer"] = os.path.abspath(tokenizer), info.meta["tokenizer"]["source"]
    elif info.meta["tokenizer"]["source"] != "trained":
        want["tokenizer"], have["tokenizer"] = "trained", info.meta["tokenizer"]["source"]
    elif vocab_size is not None and vocab_size != info.vocab_size:
        want["vocab_size"], have["vocab_size"] = vocab_size, info.vocab_size
    if not math.isclose(eval_fraction, info.meta["eval_fraction"]):
        want["eval_fraction"], have["eval_fraction"] = eval_fraction, info.meta["eval_fraction"]
    if want:
        raise ValueError(f"{info.data_dir} was prepared with {have}, but {want} was requested. Use another "
                         f"data dir, or delete this one to prepare it again")


def ensure_prepared(
    data_dir: str | os.PathLike,
    corpus: str | os.PathLike = corpus_lib.SHAKESPEARE,
    vocab_size: int | None = 4096,
    *,
    tokenizer: str | os.PathLike | None = None,
    eval_fraction: float = 0.05,
    chunk_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> DatasetInfo:
    """Returns the info of ``data_dir``, preparing it first unless it is already complete.

    Idempotent. A complete dir must have been prepared with the same corpus, vocab_size (or, when
    ``tokenizer`` is given, the same tokenizer file; vocab_size is then ignored) and eval_fraction, else
    ValueError. Processes on one machine that call this at once on the
    same dir serialize on a file lock (``.<name>.lock`` next to it): one prepares, the others wait and
    then read the result. (Hosts that share no filesystem each prepare their own, identical, copy.)
    """
    out = pathlib.Path(data_dir).absolute()
    if not (out / META).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(out.parent / f".{out.name}.lock", verbose):
            if not (out / META).is_file():
                for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed preparation
                    shutil.rmtree(stale, ignore_errors=True)
                return prepare_corpus(out, corpus, vocab_size, tokenizer=tokenizer, eval_fraction=eval_fraction,
                                      chunk_size=chunk_size, cache_dir=cache_dir, verbose=verbose)
    info = load_info(out)
    _check_matches(info, corpus, vocab_size, tokenizer, eval_fraction)
    return info
