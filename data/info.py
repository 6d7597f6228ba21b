"""A prepared data dir: what its meta.json says, and reading it back with clear errors.

A prepared data dir (format 2, written by ``data.prepare``) holds::

  train/u<unit>-<part>.array_record   the training token stream, in shards (see ``data.shards``)
  eval/u<unit>-<part>.array_record    the held-out token stream, same layout
  tokenizer.model                     the sentencepiece model
  meta.json                           written last; its presence marks the dir as complete

A split's token stream is the concatenation of its shards in the order meta.json lists them; each shard
holds records of ``chunk_size`` tokens (its last one shorter). meta.json holds per-shard token counts and
sha256 digests, per-split document counts and a digest of the document ids, never per-document lists.
Format 1 dirs (one ``<split>.array_record`` per split, made before sharding) are still read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from data.tokenizer import Tokenizer

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
META = "meta.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "eval")


def prepare_hint(data_dir) -> str:
    return f"run `python -m data prepare --corpus <shakespeare|PATH> --out {data_dir}`"


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    n_tokens: int
    n_chunks: int


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

    def shards(self, split: str) -> list[Shard]:
        """The shards of a split's token stream, in stream order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        s = self.meta["splits"][split]
        if self.meta["format_version"] == 1:
            return [Shard(os.path.join(self.data_dir, s["files"][0]), int(s["n_tokens"]), int(s["n_chunks"]))]
        return [Shard(os.path.join(self.data_dir, f["file"]), int(f["n_tokens"]), int(f["n_chunks"]))
                for f in s["files"]]

    def files(self, split: str) -> list[str]:
        return [s.path for s in self.shards(split)]

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, self.meta["tokenizer"]["file"])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_path)

    @property
    def identity(self) -> str:
        """A short hash of what makes the batches of step k what they are: tokenizer, chunking and the
        content of every split (not the directory's path)."""
        m = self.meta
        fields = ("n_tokens", "n_chunks", "documents") if m.get("format_version") == 1 else (
            "n_tokens", "n_chunks", "ids_sha256", "files")
        key = {"tokenizer": m.get("tokenizer", {}).get("sha256"), "chunk_size": m.get("chunk_size"),
               "dtype": m.get("dtype"), "splits": {s: {k: v.get(k) for k in fields}
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
        raise ValueError(f"no prepared data dir at {path}: {prepare_hint(path)}")
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
            f"Rerun the preparation (it resumes) or {prepare_hint(path)}")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ValueError(f"format_version {meta.get('format_version')!r}, expected one of {READABLE_FORMATS}")
        info = DatasetInfo.from_meta(path, meta)
        missing = [f for s in SPLITS for f in info.files(s) if not os.path.isfile(f)]
        if not os.path.isfile(info.tokenizer_path):
            missing.append(info.tokenizer_path)
        if missing:
            raise ValueError(f"missing files {missing[:5]}")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"corrupt prepared data dir {path} ({e}). Delete it and {prepare_hint(path)}") from e
    return info
