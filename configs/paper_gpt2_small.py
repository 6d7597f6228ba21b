"""The Celo2 paper's GPT-2 small pretraining task, as far as it is known: its modern architecture at GPT-2
small's shape (``paper-gpt2-small``: 12 layers, d_model 768, 12 heads of 64, context 1024), 2.47B tokens of
FineWeb with GPT-2's tokenizer in batches of 512 x 1024, AdamW.

Where each value comes from (the paper's pretraining harness and this project's issue tracker):

- shape, architecture, batch 512 x 1024, 4,712 steps (2.47B tokens), FineWeb ``sample/10BT`` with GPT-2's
  tokenizer, AdamW peak lr 4.8e-3 with betas (0.9, 0.95), weight decay 0.1, warmup 5% then cosine to 0, float32
  parameters, one evaluation after the last step on 20M held-out tokens: the paper's harness.
- final evaluation: 38 batches of 512 x 1024 = 19.9M held-out tokens.
- unknown, set as this harness's defaults and said so: gradient clipping (off, as the harness's default),
  compute dtype (bfloat16 here), remat (dots_no_batch here), AdamW's eps (1e-8), which documents were held out
  (this harness: 5% of them, by a hash of their ids).
"""
from configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/paper_gpt2_small"
    c.cpu_devices = 0
    c.model.name = "paper-gpt2-small"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.seq_len = 1024
    c.batch_size = 512
    c.steps = 4712
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.data.corpus = "hf://datasets/HuggingFaceFW/fineweb/sample/10BT"
    c.data.tokenizer = "gpt2"
    c.data.dir = "data_cache/fineweb-10BT-gpt2"
    c.optimizer.update(dict(name="adamw", lr=4.8e-3, schedule="cosine", warmup_steps=c.steps * 5 // 100,
                            min_lr_ratio=0.0, weight_decay=0.1, clip_norm=0.0))
    c.optimizer.adamw.update(dict(b1=0.9, b2=0.95))
    c.log_every = 50
    c.eval_every = c.steps
    c.eval_batches = 1
    c.final_eval_batches = 38  # 19.9M held-out tokens
    c.checkpoint_every = 500
    return c
