"""SentencePiece BPE tokenizer: training on a corpus and a small lazily loaded wrapper.

The trained model is lossless on any text: identity normalization, whitespace kept as is (no dummy
prefix, no collapsing of spaces), ``"\\n"`` as a user-defined piece (a single token) and byte fallback for
characters outside the vocabulary, so ``decode(encode(s)) == s``. Ids: 0 = ``<unk>``, 1 = ``<s>`` (BOS),
2 = ``</s>`` (EOS), no padding id. Training is deterministic (fixed sentencepiece seed; all lines are used
unless there are more than ``input_sentence_size``).
"""
from __future__ import annotations

import io
import os
import re
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from infra.files import epath, is_uri, read_bytes, write_atomic

# Settings passed to SentencePieceTrainer.train (recorded in meta.json).
TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9999,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    input_sentence_size=2_000_000,  # lines; a few MB of text has far fewer, so all of them are used
    shuffle_input_sentence=True,  # only matters above input_sentence_size
    max_sentence_length=16384,  # bytes; longer lines are cut (below) rather than skipped by the trainer
    num_threads=2,
)
TRAINER_SEED = 0
_MAX_LINE_CHARS = 4096
_PIECE_CUT = re.compile(r"(?<=[^ ]) ")  # where a run of spaces begins after other text (encode_pieces)


class Tokenizer:
    """A sentencepiece model file (a local path or a URI such as ``gs://...``), loaded on first use (the processor
    itself is never pickled)."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        self._sp = None
        self._lock = threading.Lock()

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            with self._lock:
                if self._sp is None:
                    if not epath(self.model_path).is_file():
                        raise ValueError(f"tokenizer model {self.model_path!r} does not exist")
                    sp = spm.SentencePieceProcessor()
                    try:
                        if is_uri(self.model_path):  # (sentencepiece reads local files only)
                            sp.LoadFromSerializedProto(read_bytes(self.model_path))
                        else:
                            sp.Load(self.model_path)
                    except (OSError, RuntimeError) as e:
                        raise ValueError(f"{self.model_path!r} is not a sentencepiece model: {e}") from e
                    self._sp = sp
        return self._sp

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    def __repr__(self):
        return f"Tokenizer({self.model_path!r})"

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_pieces(self, text: str, max_chars: int) -> Iterator[list[int]]:
        """The ids of ``text`` in consecutive pieces of about ``max_chars`` characters (a piece without a place to
        cut is longer), equal together to ``encode(text)``: cut only where a run of spaces begins after other
        text, which is where sentencepiece splits words too (its pieces never span one), so that a document of
        any length is tokenized within bounded memory."""
        start = 0
        while len(text) - start > max_chars:
            cuts = [m.start() for m in _PIECE_CUT.finditer(text, start + 1, start + max_chars + 1)]
            following = _PIECE_CUT.search(text, start + max_chars + 1) if not cuts else None
            if not cuts and following is None:
                break
            cut = cuts[-1] if cuts else following.start()
            yield self.sp.EncodeAsIds(text[start:cut])
            start = cut
        yield self.sp.EncodeAsIds(text[start:])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.EncodeAsIds(list(texts), num_threads=TRAINER_SETTINGS["num_threads"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in np.asarray(ids).reshape(-1)])

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @staticmethod
    def train(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 4096) -> "Tokenizer":
        """Trains a BPE model on the lines of ``texts`` (streamed: they never touch a disk) and writes it to
        ``model_path`` (a local path or a URI), atomically."""
        if vocab_size < 300:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 259 ids; use >= 300")
        spm.set_random_generator_seed(TRAINER_SEED)
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts), model_writer=proto, vocab_size=vocab_size, minloglevel=2,
                **TRAINER_SETTINGS)
        except RuntimeError as e:
            raise ValueError(
                f"sentencepiece could not train a {vocab_size}-token vocabulary: {e}. Fix: use a smaller "
                "--vocab_size (or a larger corpus)") from e
        write_atomic(model_path, proto.getvalue())
        return Tokenizer(model_path)


def _lines(texts: Iterable[str]):
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[start:start + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece
