"""A prepared data dir: what its meta.json says, and reading it back with clear errors.

A prepared data dir (format 2, written by ``data.prepare``) holds::

  train/u<unit>-<part>.array_record   the training token stream, in shards (see ``data.shards``)
  eval/u<unit>-<part>.array_record    the held-out token stream, same layout
  tokenizer.model | .json | .tiktoken the tokenizer (``data.tokenizer``: sentencepiece, Hugging Face, tiktoken)
  meta.json                           written last; its presence marks the dir as complete

A split's token stream is the concatenation of its shards in the order meta.json lists them; each shard
holds records of ``chunk_size`` tokens (its last one shorter). meta.json holds per-shard token counts and
sha256 digests, per-split document counts and a digest of the document ids, never per-document lists.
Format 1 dirs (one ``<split>.array_record`` per split, made before sharding) are still read.

A data dir may be on object storage (``gs://bucket/path``): meta.json and the tokenizer are read through
etils.epath, and the shards by ArrayRecord's own GCS client (google-cloud-cpp, built into array_record), which
finds credentials as Google's client libraries do (application default credentials; an emulator through
``CLOUD_STORAGE_EMULATOR_ENDPOINT``) and reads every record with its own HTTP request.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

import numpy as np

from data.tokenizer import KIND_FILES, Tokenizer, kind_of, load_tokenizer, options_of
from infra.files import epath, is_uri, join, list_objects, read_text, resolve

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
META = "meta.json"
TOKENIZER_FILES = tuple(KIND_FILES.values())  # a data dir holds one of them
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
            return [Shard(join(self.data_dir, s["files"][0]), int(s["n_tokens"]), int(s["n_chunks"]))]
        return [Shard(join(self.data_dir, f["file"]), int(f["n_tokens"]), int(f["n_chunks"]))
                for f in s["files"]]

    def bytes_per_token(self, split: str = "eval") -> float | None:
        """UTF-8 bytes of the split's document text per stored token (BOS tokens included); None for a data dir
        prepared before bytes were counted (prepare it again)."""
        n_bytes = self.meta["splits"][split].get("n_bytes")
        return None if n_bytes is None else n_bytes / self.n_tokens[split]

    def bits_per_byte(self, loss_nats: float, split: str = "eval") -> float | None:
        """The held-out loss as bits per byte of text: ``loss / ln 2 / bytes_per_token``. A loss in nats per
        token depends on the tokenizer; bits per byte does not (it is the code length of the same text), so
        runs with different tokenizers compare on it. None where ``bytes_per_token`` is unknown."""
        per_token = self.bytes_per_token(split)
        return None if per_token is None else loss_nats / math.log(2) / per_token

    def files(self, split: str) -> list[str]:
        return [s.path for s in self.shards(split)]

    @property
    def tokenizer_path(self) -> str:
        return join(self.data_dir, self.meta["tokenizer"]["file"])

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The data dir's tokenizer, loaded lazily (once) with the options meta.json records."""
        return load_tokenizer(self.tokenizer_path, **options_of(self.meta["tokenizer"]))

    @property
    def tokenizer_kind(self) -> str:
        """``sentencepiece``, ``hf`` or ``tiktoken`` (dirs prepared before kinds were recorded: by the file)."""
        entry = self.meta["tokenizer"]
        return entry.get("kind") or kind_of(entry["file"])

    @property
    def identity(self) -> str:
        """A short hash of what makes the batches of step k what they are: tokenizer, chunking and the
        content of every split (not the directory's path)."""
        m = self.meta
        fields = ("n_tokens", "n_chunks", "documents") if m.get("format_version") == 1 else (
            "n_tokens", "n_chunks", "ids_sha256", "files")
        tok = m.get("tokenizer", {})
        options = options_of(tok)  # (none for sentencepiece: those dirs keep the identity they had)
        key = {"tokenizer": [tok.get("sha256"), options] if options else tok.get("sha256"),
               "chunk_size": m.get("chunk_size"),
               "dtype": m.get("dtype"), "splits": {s: {k: v.get(k) for k in fields}
                                                   for s, v in m.get("splits", {}).items()}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_meta(cls, data_dir: str | os.PathLike, meta: dict[str, Any]) -> "DatasetInfo":
        splits = meta["splits"]
        return cls(
            data_dir=resolve(data_dir),
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
    """Reads a complete prepared data dir (local or gs://); ValueError (saying how to prepare it) if missing or
    corrupt."""
    path = os.fspath(data_dir)
    if not epath(path).is_dir():
        raise ValueError(f"no prepared data dir at {path}: {prepare_hint(path)}")
    meta_path = join(path, META)
    complete = epath(meta_path).is_file()
    if not complete and epath(join(path, "config.json")).is_file() and epath(join(path, "checkpoints")).is_dir():
        try:
            data_dir = json.loads(read_text(join(path, "config.json")))["data"]["dir"]
        except (ValueError, KeyError, TypeError):
            data_dir = "the data.dir in its config.json"
        raise ValueError(f"{path} is a training run's workdir, not a prepared data dir; its data is {data_dir}")
    if not complete:
        raise ValueError(
            f"{path} is not a complete prepared data dir (no {META}: its preparation never finished). "
            f"Rerun the preparation (it resumes) or {prepare_hint(path)}")
    try:
        meta = json.loads(read_text(meta_path))
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ValueError(f"format_version {meta.get('format_version')!r}, expected one of {READABLE_FORMATS}")
        info = DatasetInfo.from_meta(path, meta)
        missing = _missing_files(info)
        if missing:
            raise ValueError(f"missing files {missing[:5]}")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"corrupt prepared data dir {path} ({e}). Delete it and {prepare_hint(path)}") from e
    return info


def _missing_files(info: DatasetInfo) -> list[str]:
    """The shards and tokenizer that meta.json names but the data dir lacks (one listing on object storage)."""
    wanted = [f for s in SPLITS for f in info.files(s)] + [info.tokenizer_path]
    if is_uri(info.data_dir):
        present = list_objects(info.data_dir)
        return [f for f in wanted if f not in present]
    return [f for f in wanted if not os.path.isfile(f)]
