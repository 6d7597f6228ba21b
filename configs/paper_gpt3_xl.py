"""The Celo2 paper's GPT-3 XL pretraining task, as far as it is known: its modern architecture at GPT-3 XL's
shape (``paper-gpt3-xl``: 24 layers, d_model 2048, 16 heads of 128, context 2048; RMSNorm without scale, QK-norm,
rotary positions, no biases, untied embeddings, GELU MLP of 4x width), 10B tokens of FineWeb with GPT-2's
tokenizer in batches of 512 x 2048, AdamW.

Where each value comes from (the paper's pretraining harness, the public ``pretraining/`` code its README
points to, and the task description of this project's issue tracker):

- shape, architecture, context, batch 512, 10B tokens of FineWeb (``sample/10BT``), GPT-2's tokenizer, AdamW
  peak lr 2e-4 with betas (0.9, 0.95), weight decay 0.1, warmup 5% of the steps then cosine to 0, float32
  parameters, one evaluation after the last step on 20M held-out tokens: the paper's harness.
- steps: 10e9 / (512 * 2048) = 9536.7, so 9536 (9,999,220,736 tokens).
- final evaluation: 19 batches of 512 x 2048 = 19.9M held-out tokens (the nearest whole number of batches).
- unknown, set as this harness's defaults and said so: gradient clipping (the harness's is off by default:
  off here), compute dtype (bfloat16 with float32 parameters here), remat (full here, to fit 80 GB GPUs),
  AdamW's eps (1e-8), which FineWeb documents were held out (this harness holds out 5% of the documents by a
  hash of their ids).
- FineWeb's ``sample/10BT`` holds about 10B GPT-2 tokens, so with 5% held out the 10B training tokens are about
  1.05 passes over the rest (the comparison tool warns above one); a larger sample (``sample/100BT``) keeps it
  to one pass, at ten times the preparation.
"""
from configs.base import base_config

TOKENS = 10_000_000_000


def get_config():
    c = base_config()
    c.workdir = "runs/paper_gpt3_xl"
    c.cpu_devices = 0
    c.model.name = "paper-gpt3-xl"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.seq_len = 2048
    c.batch_size = 512
    c.steps = TOKENS // (c.batch_size * c.seq_len)  # 9536
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.data.corpus = "hf://datasets/HuggingFaceFW/fineweb/sample/10BT"
    c.data.tokenizer = "gpt2"
    c.data.dir = "data_cache/fineweb-10BT-gpt2"
    c.optimizer.update(dict(name="adamw", lr=2e-4, schedule="cosine", warmup_steps=c.steps * 5 // 100,
                            min_lr_ratio=0.0, weight_decay=0.1, clip_norm=0.0))
    c.optimizer.adamw.update(dict(b1=0.9, b2=0.95))
    c.log_every = 50
    c.eval_every = c.steps  # the paper evaluates once, after the last step
    c.eval_batches = 1
    c.final_eval_batches = 19  # 19.9M held-out tokens
    c.checkpoint_every = 500
    return c
