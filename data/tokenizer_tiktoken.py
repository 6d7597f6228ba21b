"""A tiktoken BPE: a ``.tiktoken`` ranks file and the ``tiktoken`` kind of ``data.tokenizer``.

A ranks file holds one ``<base64 of a token's bytes> <rank>`` line per token, ranks 0..n-1, the format
``tiktoken.load.load_tiktoken_bpe`` reads (``parse_ranks``, ``dump_ranks``). BPE merges the adjacent pair of
parts whose concatenation has the lowest rank, within each pre-token of the split ``pattern``. Options:
``pattern`` (default GPT-2's), ``special_tokens`` (default ``{"<|endoftext|>": n}``, the id after the last
rank) and ``eot_token`` (default ``<|endoftext|>``), the special token that begins every document. With GPT-2's
ranks the defaults give exactly GPT-2's encoding (tiktoken's ``gpt2``). A tiktoken encoding name (``gpt2``,
``cl100k_base``...) is stored in a data dir as its ranks file with its own pattern and special tokens
(``encoding_source``).

Documents are encoded with ``encode_ordinary`` (special tokens' text stays text). Long documents are cut into
pieces only under GPT-2's pattern (``data.tokenizer.WHITESPACE_RUN_START``); other patterns (cl100k's joins
punctuation with the newlines after it) encode a document whole, holding about (its characters + 2 x its ids)
x 8 bytes of intermediate lists at once.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from typing import Any, Iterable, Sequence

from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # the split pattern of tiktoken's gpt2

from data.tokenizer import WHITESPACE_RUN_START, Tokenizer, _ids

ENDOFTEXT = "<|endoftext|>"


def parse_ranks(blob: bytes, where: str) -> dict[bytes, int]:
    """{token bytes: rank} of a ranks file; ValueError naming the line of a malformed one, or ranks that are not
    0..n-1 each once."""
    ranks = {}
    for number, line in enumerate(blob.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{where}:{number} is not a '<base64 token> <rank>' line of a .tiktoken ranks file "
                             f"({line[:60]!r})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once (repeated or "
                         "missing ranks, or a token listed twice)")
    return ranks


def dump_ranks(ranks: dict[bytes, int]) -> bytes:
    """The ranks file of ``ranks``, in rank order (``parse_ranks`` reads it back)."""
    return b"".join(base64.b64encode(token) + b" %d\n" % rank
                    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


class TiktokenTokenizer(Tokenizer):
    """A ``.tiktoken`` ranks file; options ``pattern``, ``special_tokens``, ``eot_token``."""

    kind = "tiktoken"

    def _load(self, blob: bytes):
        import tiktoken

        ranks = parse_ranks(blob, self.path)
        special = self.options.get("special_tokens") or {ENDOFTEXT: len(ranks)}
        eot = self.options.get("eot_token") or ENDOFTEXT
        if eot not in special:
            raise ValueError(f"{self.path}: eot_token {eot!r} is not one of its special tokens {sorted(special)[:8]}")
        if any(i < len(ranks) for i in special.values()):
            raise ValueError(f"{self.path}: special tokens {special} reuse ids of its {len(ranks)} ranks")
        try:
            return tiktoken.Encoding(os.path.basename(self.path), pat_str=self.options.get("pattern", GPT2_PATTERN),
                                     mergeable_ranks=ranks, special_tokens=special)
        except ValueError as e:
            raise ValueError(f"{self.path}: tiktoken refused its ranks, pattern or special tokens ({e})") from e

    def resolved_options(self) -> dict[str, Any]:
        return {"pattern": self.lib._pat_str, "special_tokens": dict(self.lib._special_tokens),
                "eot_token": self.boundary_token}

    def encode(self, text: str) -> list[int]:
        return self.lib.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.lib.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.lib.decode(_ids(ids))

    def cut_pattern(self) -> re.Pattern | None:
        return WHITESPACE_RUN_START if self.options.get("pattern", GPT2_PATTERN) == GPT2_PATTERN else None

    @property
    def vocab_size(self) -> int:
        return self.lib.n_vocab

    @property
    def bos_id(self) -> int:
        return self.lib.encode_single_token(self.boundary_token)

    @property
    def boundary_token(self) -> str:
        return self.options.get("eot_token") or ENDOFTEXT


def encoding_source(name: str) -> tuple[bytes, dict[str, Any]]:
    """(ranks file, options) of the tiktoken encoding ``name``, which tiktoken fetches or reads from its cache
    (``TIKTOKEN_CACHE_DIR``; it checks the files' sha256); ValueError with the fix when it cannot."""
    import tiktoken

    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - a failed download surfaces as requests' or urllib's own errors
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        raise ValueError(
            f"tiktoken could not load encoding {name!r} ({type(e).__name__}; a download fails without the network): "
            f"it fetches its files once into TIKTOKEN_CACHE_DIR (here {cache}); run once where the network is "
            "reachable, copy that cache here, or give a .tiktoken ranks file") from e
    eot = ENDOFTEXT if ENDOFTEXT in enc._special_tokens else None
    options = {"pattern": enc._pat_str, "special_tokens": dict(enc._special_tokens)}
    return dump_ranks(enc._mergeable_ranks), {**options, **({"eot_token": eot} if eot else {})}
