"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library): the ``hf`` kind of ``data.tokenizer``.

Documents begin with the tokenizer's end-of-text token: the ``eot_token`` option, else the first of
``KNOWN_EOT`` among its special added tokens; it must be a special added token, which text never encodes to
(documents are encoded with ``encode_special_tokens`` on: a special token's text in a document is tokenized
as ordinary text). No special tokens are added around a document (``add_special_tokens=False``).

Long documents are cut into pieces (``encode_pieces``) only for the byte-level BPE layout of GPT-2, whose
pre-tokenizer regex never joins across the start of a whitespace run (``data.tokenizer.WHITESPACE_RUN_START``):
no normalizer, the ``ByteLevel`` pre-tokenizer alone with its regex and without a prefix space, a BPE model
without dropout, and no added token that ordinary text could match across whitespace. Any other
tokenizer.json encodes a document whole, holding about (its characters + 2 x its ids) x 8 bytes of
intermediate lists at once.
"""
from __future__ import annotations

import json
import re
import types
from typing import Iterable, Sequence

from data.tokenizer import WHITESPACE, WHITESPACE_RUN_START, Tokenizer, _ids

KNOWN_EOT = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "<|im_end|>")
_SPACE = re.compile(f"[{WHITESPACE}]")


class HFTokenizer(Tokenizer):
    """A tokenizer.json; option ``eot_token`` (default: found among its special added tokens)."""

    kind = "hf"

    def _load(self, blob: bytes) -> types.SimpleNamespace:
        import tokenizers

        try:
            text = blob.decode("utf-8")
            tk = tokenizers.Tokenizer.from_str(text)
            layout = json.loads(text)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for what it cannot parse
            raise ValueError(f"{self.path!r} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from e
        tk.encode_special_tokens = True
        tk.no_truncation()
        tk.no_padding()
        special = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        eot = self.options.get("eot_token") or next((t for t in KNOWN_EOT if t in special), None)
        if eot is None:
            raise ValueError(
                f"{self.path}: no end-of-text token among its special added tokens {sorted(special)[:8]}; name the "
                f"one that ends a document with --eot_token (data.eot_token)")
        if eot not in special:
            raise ValueError(f"{self.path}: eot_token {eot!r} is not one of its special added tokens "
                             f"{sorted(special)[:8]}, so text could encode to it; name one of them")
        vocab = tk.get_vocab(with_added_tokens=True)
        unk = (layout.get("model") or {}).get("unk_token")
        return types.SimpleNamespace(tk=tk, eot=eot, eot_id=special[eot], vocab_size=max(vocab.values()) + 1,
                                     unk_id=vocab.get(unk) if unk else None, cuttable=_cuttable(layout))

    def resolved_options(self) -> dict:
        return {**self.options, "eot_token": self.boundary_token}

    def encode(self, text: str) -> list[int]:
        return self.lib.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """One ``encode_batch_fast`` call, on the library's own thread pool (TOKENIZERS_PARALLELISM,
        RAYON_NUM_THREADS: the preparation's worker processes set it to one thread each)."""
        return [e.ids for e in self.lib.tk.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.lib.tk.decode(_ids(ids), skip_special_tokens=False)

    def cut_pattern(self) -> re.Pattern | None:
        return WHITESPACE_RUN_START if self.lib.cuttable else None

    @property
    def vocab_size(self) -> int:
        return self.lib.vocab_size

    @property
    def bos_id(self) -> int:
        return self.lib.eot_id

    @property
    def unk_id(self) -> int | None:
        return self.lib.unk_id

    @property
    def boundary_token(self) -> str:
        return self.lib.eot


def _cuttable(layout: dict) -> bool:
    """Whether the tokenizer.json's layout is GPT-2's byte-level BPE, which ``WHITESPACE_RUN_START`` may cut (see
    the module docstring)."""
    pre, model = layout.get("pre_tokenizer") or {}, layout.get("model") or {}
    byte_level = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))
    added_ok = all(t.get("special") or not (_SPACE.search(t["content"]) or t.get("lstrip") or t.get("rstrip"))
                   for t in layout.get("added_tokens") or [])
    return (layout.get("normalizer") is None and byte_level and model.get("type") == "BPE"
            and not model.get("dropout") and added_ok)
