"""A prepared data dir's tokenizer as a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``), for exports.

The data dir's tokenizer file decides the conversion (``hf_tokenizer``):

- ``tokenizer.json`` (HF tokenizers already): taken as it is.
- ``tokenizer.tiktoken`` (tiktoken BPE ranks, one ``<base64 bytes> <rank>`` line each, split by GPT-2's pattern,
  ``<|endoftext|>`` = the id after the last rank): a byte-level BPE as GPT-2's own files are, its vocabulary
  the ranks (bytes spelt with GPT-2's byte-to-unicode table) and its merges every split ``(a, b)`` of a token
  into two tokens, ordered by the merged token's rank (transformers' ``TikTokenConverter``). tiktoken merges the
  adjacent pair whose concatenation has the lowest rank first; so does a BPE with those merges.
- ``tokenizer.model`` (sentencepiece BPE with ``data.tokenizer``'s settings): ``sentencepiece_bpe`` below.

Every result also gets a post-processor that puts the data's boundary token (BOS) first, as before every
training document: ``tok(text)`` gives ``[bos] + ids``, ``tok(text, add_special_tokens=False)`` the run
tokenizer's ``ids`` exactly. ``save_pretrained_files`` writes the files ``AutoTokenizer.from_pretrained`` reads.
"""
from __future__ import annotations

import json
import os
import re

from infra.files import exists, join, read_bytes, write_atomic

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
SOURCES = ("tokenizer.json", "tokenizer.tiktoken", "tokenizer.model")
_SPACE = "\u2581"  # sentencepiece's visible space, "▁"
_NORMAL, _USER_DEFINED = 1, 4  # sentencepiece piece types
_BPE = 2  # sentencepiece model type


def _model_proto(path: str):
    """The sentencepiece ``ModelProto`` of a model file (the protobuf classes sentencepiece ships, or
    transformers' copy when those do not load with the installed protobuf runtime)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception:  # noqa: BLE001 - a protobuf gencode/runtime version mismatch raises its own error type
        from transformers.utils import sentencepiece_model_pb2_new as pb
    proto = pb.ModelProto()
    proto.ParseFromString(read_bytes(path))
    return proto


def _check_spm_settings(proto, path: str) -> None:
    """ValueError unless the model encodes as ``data.tokenizer`` trains it (what ``sentencepiece_bpe`` mirrors)."""
    n, t = proto.normalizer_spec, proto.trainer_spec
    wrong = [name for name, ok in (
        ("model_type=bpe", t.model_type == _BPE), ("identity normalization", not n.precompiled_charsmap),
        ("add_dummy_prefix=false", not n.add_dummy_prefix), ("remove_extra_whitespaces=false",
                                                            not n.remove_extra_whitespaces),
        ("escape_whitespaces=true", n.escape_whitespaces), ("split_by_whitespace=true", t.split_by_whitespace),
        ("treat_whitespace_as_suffix=false", not t.treat_whitespace_as_suffix)) if not ok]
    if wrong:
        raise ValueError(f"{path}: only sentencepiece BPE models with data/tokenizer.py's settings convert to "
                         f"tokenizers; this one lacks {', '.join(wrong)}")


def sentencepiece_bpe(path: str):
    """A ``tokenizers.Tokenizer`` giving the ids of the sentencepiece BPE model at ``path``.

    sentencepiece encodes a text (spaces written as "▁") by starting from its characters, user-defined pieces
    (here "\\n") matched whole and frozen, and merging, again and again, the adjacent pair whose concatenation is
    the vocabulary piece of highest score (leftmost first); characters left outside the vocabulary become
    their UTF-8 byte pieces ``<0xXX>``. Here: the same vocabulary; a merge ``(a, b)`` for every split of a
    normal piece into two normal pieces, ranked by the piece's score; byte fallback; user-defined pieces
    isolated before the merges; and the text pre-split where sentencepiece splits words (before each run of
    "▁", or each "▁" without ``allow_whitespace_only_pieces``), across which no piece reaches. One known
    difference: pairs that overlap and merge into the same piece (``ab|a|ba`` -> ``aba``) are merged leftmost
    first by sentencepiece, by the rank of their split here.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _model_proto(path)
    _check_spm_settings(proto, path)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
    ranked = sorted((-score, vocab[piece], piece[:k], piece[k:]) for piece, score in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    merges = [(a, b) for _, _, a, b in ranked]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    word = f"{_SPACE}+[^{_SPACE}]*" if proto.trainer_spec.allow_whitespace_only_pieces else f"{_SPACE}[^{_SPACE}]*"
    splits = [pre_tokenizers.Split(Regex(word), behavior="isolated")]
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        pattern = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        splits.insert(0, pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                            if p.type in (2, 3)])  # unknown, control
    return tok


def tiktoken_bpe(path: str, pattern: str = GPT2_PATTERN):
    """A byte-level BPE ``tokenizers.Tokenizer`` giving tiktoken's ids for the ranks file at ``path`` split by
    ``pattern``, with ``<|endoftext|>`` as the special token after the last rank (module docstring)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=path, pattern=pattern).converted()
    n_ranks = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    if tok.token_to_id(ENDOFTEXT) != n_ranks:
        raise ValueError(f"{path}: its ranks are not 0 .. {n_ranks - 1} ({ENDOFTEXT} got id "
                         f"{tok.token_to_id(ENDOFTEXT)}, expected {n_ranks})")
    return tok


def source_file(data_dir: str, named: str | None = None) -> str:
    """The tokenizer file of a prepared data dir: the one its meta.json names (``named``), else the first of
    ``SOURCES`` present."""
    if named and os.path.basename(named) in SOURCES and exists(named):
        return named
    for name in SOURCES:
        if exists(join(data_dir, name)):
            return join(data_dir, name)
    raise ValueError(f"{data_dir} holds no tokenizer ({', '.join(SOURCES)}): prepare it with `python -m data "
                     "prepare`")


def hf_tokenizer(path: str, bos_id: int, pattern: str = GPT2_PATTERN):
    """The ``tokenizers.Tokenizer`` of a tokenizer file (by its name: ``SOURCES``) that puts ``bos_id`` first."""
    from tokenizers import Tokenizer, processors

    name = os.path.basename(path)
    if name == "tokenizer.json":
        tok = Tokenizer.from_str(read_bytes(path).decode())
    elif name == "tokenizer.tiktoken":
        tok = tiktoken_bpe(path, pattern)
    elif name == "tokenizer.model":
        tok = sentencepiece_bpe(path)
    else:
        raise ValueError(f"{path}: not a tokenizer file this converts (its name must be one of {', '.join(SOURCES)})")
    bos = tok.id_to_token(bos_id)
    if bos is None:
        raise ValueError(f"{path}: the data's boundary token id {bos_id} is outside its vocabulary")
    tok = _without_templates(tok)
    first = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok.post_processor = first if tok.post_processor is None else processors.Sequence([tok.post_processor, first])
    return tok


def _without_templates(tok):
    """``tok`` without the special-token templates of its post-processor (a tokenizer.json may add BOS or EOS
    its own way; ``hf_tokenizer`` puts the boundary token first itself), other post-processing (ByteLevel's
    offsets) kept."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    post = spec.get("post_processor")
    if post and post.get("type") == "TemplateProcessing":
        spec["post_processor"] = None
    elif post and post.get("type") == "Sequence":
        kept = [p for p in post["processors"] if p.get("type") != "TemplateProcessing"]
        spec["post_processor"] = {**post, "processors": kept} if kept else None
    return Tokenizer.from_str(json.dumps(spec))


def save_pretrained_files(tok, out_dir: str, bos_id: int, eos_id: int, unk_id: int | None,
                          model_max_length: int) -> list[str]:
    """Write ``tok`` where ``transformers.AutoTokenizer.from_pretrained(out_dir)`` finds it (tokenizer.json,
    tokenizer_config.json, special tokens by their ids); the names of the files written. Special tokens in the
    text are encoded as text (``split_special_tokens``), as the run's tokenizer does: "<s>" typed in a prompt is
    not the boundary token."""
    from transformers import PreTrainedTokenizerFast

    names = {"bos_token": tok.id_to_token(bos_id), "eos_token": tok.id_to_token(eos_id)}
    if unk_id is not None and unk_id >= 0 and tok.id_to_token(unk_id) is not None:
        names["unk_token"] = tok.id_to_token(unk_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, split_special_tokens=True, **names)
    written = [str(f) for f in fast.save_pretrained(out_dir)]
    config = join(out_dir, "tokenizer_config.json")
    settings = json.loads(read_bytes(config))  # the class name every transformers version knows (5.x writes its
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # own, TokenizersBackend, which 4.x cannot load)
    write_atomic(config, json.dumps(settings, indent=2).encode())
    return written
