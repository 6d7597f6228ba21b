"""Data: corpus preparation (a trained sentencepiece BPE or a pretrained tokenizer + ArrayRecord token chunks) and
the grain input pipeline.

    info = ensure_prepared("data/shakespeare", corpus="shakespeare", vocab_size=4096)
    info = ensure_prepared("data/fineweb-gpt2", corpus="hf://datasets/HuggingFaceFW/fineweb/sample/10BT",
                           tokenizer="gpt2")  # or a tokenizer.json, a .tiktoken file, a sentencepiece .model
    it = train_iterator(info, seq_len=256, global_batch_size=32, seed=0,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        start_step=step)
    batch = next(it)  # {"inputs", "targets", "segment_ids": int32, "loss_mask": float32} [B/P, L]
    evals = eval_batches(info, seq_len=256, batch_size=32, ...)

CLI: ``python -m data prepare --corpus shakespeare --out DIR``, ``python -m data info DIR`` and
``python -m data bench``. See ``data.corpus`` for the input formats, ``data.prepare`` and ``data.shards`` for
how a corpus is prepared, ``data.tokenizer`` for the tokenizer kinds, ``data.info`` for the on-disk format and
``data.pipeline`` for the example and batch semantics.
"""
from data.pipeline import eval_batches, train_iterator
from data.info import DatasetInfo, load_info
from data.prepare import ensure_prepared, prepare_corpus
from data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ensure_prepared", "prepare_corpus", "load_info", "DatasetInfo", "Tokenizer", "load_tokenizer",
           "train_iterator", "eval_batches"]
