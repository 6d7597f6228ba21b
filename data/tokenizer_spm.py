"""SentencePiece BPE: training on a corpus, and the ``sentencepiece`` kind of ``data.tokenizer``.

The trained model is lossless on any text: identity normalization, whitespace kept as is (no dummy
prefix, no collapsing of spaces), ``"\\n"`` as a user-defined piece (a single token) and byte fallback for
characters outside the vocabulary, so ``decode(encode(s)) == s``. Ids: 0 = ``<unk>``, 1 = ``<s>`` (BOS, the
document boundary), 2 = ``</s>`` (EOS), no padding id. Training is deterministic (fixed sentencepiece seed;
all lines are used unless there are more than ``input_sentence_size``).
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

from data.tokenizer import Tokenizer, _ids
from infra.files import write_atomic

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
# Where a run of spaces begins after other text: sentencepiece splits words there too (its pieces never span
# such a place), so encode_pieces may cut there.
_PIECE_CUT = re.compile(r"(?<=[^ ]) ")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file; documents begin with its BOS."""

    kind = "sentencepiece"

    def _load(self, blob: bytes) -> spm.SentencePieceProcessor:
        if self.options.get("eot_token"):
            raise ValueError(f"{self.path}: a sentencepiece model's documents begin with its BOS; --eot_token is for "
                             "tokenizer.json and tiktoken tokenizers")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(blob)
        except RuntimeError as e:
            raise ValueError(f"{self.path!r} is not a sentencepiece model ({str(e).strip()})") from e
        if sp.bos_id() < 0:
            raise ValueError(f"tokenizer {self.path} defines no BOS id (the document boundary); train it with "
                             "bos_id >= 0")
        return sp

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        return self.lib

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.EncodeAsIds(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds(_ids(ids))

    def cut_pattern(self) -> re.Pattern:
        return _PIECE_CUT

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

    @property
    def boundary_token(self) -> str:
        return self.sp.IdToPiece(self.bos_id)


def train_sentencepiece(texts: Iterable[str], model_path: str | os.PathLike,
                        vocab_size: int = 4096) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(model_path)


def _lines(texts: Iterable[str]):
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[start:start + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece
