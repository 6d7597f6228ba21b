"""The tokenizer of a prepared data dir: one interface, one class per kind, chosen by the file's name.

- ``sentencepiece``: ``tokenizer.model`` (the sentencepiece library, ``data.tokenizer_spm``); documents begin
  with its BOS ``<s>`` (id 1 when trained here).
- ``hf``: ``tokenizer.json`` (Hugging Face's ``tokenizers`` library, ``data.tokenizer_hf``); documents begin
  with its end-of-text special token (``<|endoftext|>``, ``</s>``, ``<eos>``..., or the one named).
- ``tiktoken``: ``tokenizer.tiktoken``, a ranks file (the ``tiktoken`` library, ``data.tokenizer_tiktoken``);
  documents begin with ``<|endoftext|>``, the id after the last rank (GPT-2: 50256).

Every kind encodes a document as ordinary text: a special token written in a document (``<|endoftext|>`` in a
web page) is tokenized as the characters it is, never as the special id, so the boundary id only ever marks a
document boundary. A tokenizer pickles as its path and options; the library object is loaded from the file's
bytes (a local path or a URI) on first use in each process. ``load_tokenizer(path, **options)`` picks the
class by the file's suffix; the options (``eot_token``; for tiktoken also ``pattern`` and ``special_tokens``)
are those recorded in meta.json's ``tokenizer`` entry (``options_of``).

``encode_pieces`` tokenizes a long document within bounded memory, in pieces cut only where the kind's
pre-tokenizer never joins across (``cut_pattern``), so the pieces' ids together are exactly the whole
document's; a tokenizer without such a place (``cut_pattern`` None) encodes the document whole.
"""
from __future__ import annotations

import abc
import importlib
import os
import re
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from infra.files import epath, read_bytes

KIND_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json", "tiktoken": "tokenizer.tiktoken"}
SUFFIX_KINDS = {".model": "sentencepiece", ".json": "hf", ".tiktoken": "tiktoken"}
OPTIONS = ("eot_token", "pattern", "special_tokens")  # meta.json's tokenizer entry: what loading it takes
_MODULES = {"sentencepiece": ("data.tokenizer_spm", "SentencePieceTokenizer"),
            "hf": ("data.tokenizer_hf", "HFTokenizer"),
            "tiktoken": ("data.tokenizer_tiktoken", "TiktokenTokenizer")}

# Unicode's White_Space characters: what ``\s`` matches in the regex engines of tiktoken (fancy-regex) and of
# tokenizers (Oniguruma). Python's own ``\s`` also matches U+001C..U+001F, which those engines do not.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Where a run of whitespace begins after other text. GPT-2's pre-tokenizer regex never puts such a place inside
# a pre-token: none of its alternatives continues from a non-whitespace character into whitespace, and a run
# of whitespace starts a pre-token of its own; it has no look-behind, so matching from there on does not
# depend on what came before, and the text before it pre-tokenizes as it does within the whole.
WHITESPACE_RUN_START = re.compile(f"(?<=[^{WHITESPACE}])[{WHITESPACE}]")


class Tokenizer(abc.ABC):
    """A tokenizer file (local path or URI) of one kind, loaded on first use; see the module docstring."""

    kind: str = ""

    def __init__(self, path: str | os.PathLike, **options: Any):
        self.path = os.fspath(path)
        self.options = options
        self._lib = None
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(cls, blob: bytes, path: str, **options: Any) -> "Tokenizer":
        """A tokenizer parsed from ``blob`` at once (a file not written yet; ``path`` names it in errors)."""
        tok = cls(path, **options)
        tok._lib = tok._load(blob)
        return tok

    @property
    def lib(self):
        """The loaded library object (what ``_load`` returns)."""
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    if not epath(self.path).is_file():
                        raise ValueError(f"tokenizer file {self.path!r} does not exist")
                    self._lib = self._load(read_bytes(self.path))
        return self._lib

    @abc.abstractmethod
    def _load(self, blob: bytes):
        """The library object of the file's bytes; ValueError (one line, naming ``self.path``) if they are not a
        tokenizer of this kind or lack what it needs (an end-of-text token)."""

    def __getstate__(self):
        return {"path": self.path, "options": self.options}

    def __setstate__(self, state):
        self.__init__(state["path"], **state["options"])

    def __repr__(self):
        options = "".join(f", {k}={v!r}" for k, v in self.options.items() if k == "eot_token")
        return f"{type(self).__name__}({self.path!r}{options})"

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` as ordinary text (no special token comes from it)."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in one call of the library (its own threads: ``num_threads``)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: ``decode(encode(s)) == s`` for the lossless kinds (byte-level BPE, the
        sentencepiece models trained here)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """The id that begins every document in a prepared split (the document boundary)."""

    @property
    def eos_id(self) -> int:
        """The tokenizer's end-of-sequence id; the boundary itself where it has no separate one."""
        return self.bos_id

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    @abc.abstractmethod
    def boundary_token(self) -> str:
        """The text of ``bos_id`` (``<s>``, ``<|endoftext|>``)."""

    def cut_pattern(self) -> re.Pattern | None:
        """Where a document may be cut without changing its ids (see ``encode_pieces``); None: nowhere."""
        return None

    def encode_pieces(self, text: str, max_chars: int) -> Iterator[list[int]]:
        """The ids of ``text`` in consecutive pieces of about ``max_chars`` characters (a piece without a place
        to cut is longer), equal together to ``encode(text)``: cut only at ``cut_pattern``'s matches, where the
        tokenizer's pre-tokenizer splits too, so a document of any length is tokenized within bounded memory.
        Without a cut pattern the document is encoded whole (memory then grows with its length)."""
        cut_at = self.cut_pattern()
        start = 0
        while cut_at is not None and len(text) - start > max_chars:
            cuts = [m.start() for m in cut_at.finditer(text, start + 1, start + max_chars + 1)]
            following = cut_at.search(text, start + max_chars + 1) if not cuts else None
            if not cuts and following is None:
                break
            cut = cuts[-1] if cuts else following.start()
            yield self.encode(text[start:cut])
            start = cut
        yield self.encode(text[start:])

    def resolved_options(self) -> dict[str, Any]:
        """The options with the defaults it loaded with filled in (what meta.json records)."""
        return dict(self.options)

    def entry(self) -> dict[str, Any]:
        """meta.json's description of this tokenizer: its kind and the options it loads with."""
        return {"kind": self.kind, **self.resolved_options()}


def _ids(ids: Iterable[int]) -> list[int]:
    """Token ids (a list, or an array of any integer dtype or shape) as a flat list of Python ints."""
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def kind_of(path: str | os.PathLike) -> str:
    """The kind of a tokenizer file, by its suffix; ValueError naming the kinds for any other file."""
    kind = SUFFIX_KINDS.get(os.path.splitext(os.fspath(path))[1].lower())
    if kind is None:
        raise ValueError(
            f"tokenizer {os.fspath(path)!r} is of no known kind: give a sentencepiece .model, a Hugging Face "
            "tokenizer.json, a .tiktoken ranks file, or a tiktoken encoding name such as gpt2")
    return kind


def tokenizer_class(kind: str) -> type[Tokenizer]:
    module, name = _MODULES[kind]
    return getattr(importlib.import_module(module), name)


def load_tokenizer(path: str | os.PathLike, **options: Any) -> Tokenizer:
    """The tokenizer of the file ``path`` (kind by its suffix: ``.model``, ``.json``, ``.tiktoken``), loaded
    lazily with ``options`` (``options_of`` a meta.json entry)."""
    return tokenizer_class(kind_of(path))(path, **options)


def options_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The loading options recorded in a meta.json ``tokenizer`` entry (none in dirs prepared before them)."""
    return {k: entry[k] for k in OPTIONS if k in entry}
