"""Pretrained-tokenizer files and FineWeb-style corpora built in a test, with the real libraries.

- ``train_byte_level_bpe``: a GPT-2-style byte-level BPE trained with ``tokenizers`` (ByteLevel pre-tokenizer,
  no prefix space), saved as a tokenizer.json whose ``<|endoftext|>`` comes after the merges, as GPT-2's does.
- ``ranks_of``: the same BPE as tiktoken ranks (each token's bytes -> its id; the ids of the merged tokens are
  in merge order, which is tiktoken's merge priority), so a ``.tiktoken`` file of them encodes as the
  tokenizer.json does.
- ``write_fineweb``: parquet files in FineWeb's schema and nested layout.
"""
from __future__ import annotations

import datetime
import pathlib
import uuid

import numpy as np

EOT = "<|endoftext|>"
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")


def train_byte_level_bpe(texts, path: pathlib.Path, vocab_size: int = 1000):
    """A byte-level BPE of ``vocab_size`` ids trained on ``texts``, then ``<|endoftext|>`` (id vocab_size),
    saved as ``path``; returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.add_special_tokens([EOT])
    tk.save(str(path))
    return tk


def byte_chars() -> dict[str, int]:
    """The ByteLevel alphabet: the character that stands for each byte in a byte-level BPE's vocabulary (bytes
    that print as themselves keep their code point, the other 68 take 256, 257, ... in byte order), checked
    against the library's own alphabet and its mapping of the ASCII bytes."""
    from tokenizers import pre_tokenizers

    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = iter(range(256, 512))
    chars = {chr(b if b in kept else next(moved)): b for b in range(256)}
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert all(chars[level.pre_tokenize_str(chr(b))[0][0]] == b for b in range(128))
    return chars


def ranks_of(tk) -> dict[bytes, int]:
    """{token bytes: id} of a byte-level BPE's non-special tokens."""
    chars = byte_chars()
    special = {t.content for t in tk.get_added_tokens_decoder().values()}
    return {bytes(chars[c] for c in token): i
            for token, i in tk.get_vocab(with_added_tokens=True).items() if token not in special}


def dump_tiktoken(ranks: dict[bytes, int], path: pathlib.Path) -> pathlib.Path:
    """``ranks`` as a .tiktoken file (the tests read it back with tiktoken's own loader)."""
    from data.tokenizer_tiktoken import dump_ranks

    path.write_bytes(dump_ranks(ranks))
    return path


def write_fineweb(root: pathlib.Path, files: dict[str, list[str]], count_tokens) -> list[dict]:
    """Parquet files ``root/<relpath>`` with FineWeb's columns, one row per text; ``count_tokens(text)`` fills
    ``token_count``. Returns every row, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
                        ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
                        ("language_score", pa.float64()), ("token_count", pa.int64())])
    rows = []
    for rel, texts in files.items():
        dump = "CC-MAIN-2024-10" if "CC-MAIN-2024-10" in rel else "CC-MAIN-2013-20"
        part = [{"text": t, "id": f"<urn:uuid:{uuid.UUID(int=int(rng.integers(2**62)) << 64 | i)}>", "dump": dump,
                 "url": f"http://www.example.org/{dump.lower()}/page-{i}.html",
                 "date": (datetime.datetime(2013, 5, 18) + datetime.timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "file_path": f"s3://commoncrawl/crawl-data/{dump}/segments/1368696381249.29/warc/"
                              f"CC-MAIN-20130516092621-{i:05d}-ip-10-60-113-184.ec2.internal.warc.gz",
                 "language": "en", "language_score": float(rng.uniform(0.65, 0.99)), "token_count": count_tokens(t)}
                for i, t in enumerate(texts)]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path, row_group_size=64)
        rows += part
    return rows
