"""GPT-2 small (124M) on a GPU/TPU host: bfloat16 compute, 0.5M-token batches, 10B tokens by default.

The vocabulary comes from the prepared corpus's tokenizer (GPT-2's own 50,257-token BPE:
--config.data.tokenizer=gpt2, padded to 50,304). Mesh: all devices on fsdp.
"""
from configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/gpt2_small"
    c.cpu_devices = 0
    c.model.name = "gpt2-small"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.seq_len = 1024
    c.batch_size = 512
    c.steps = 19073  # 10B tokens
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optimizer.update(dict(lr=6e-4, warmup_steps=700))
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.eval_batches = 20
    return c
