"""GPT-3 XL (1.3B) as in Brown et al. 2020: context 2048, 1M-token batches, peak lr 2e-4, bfloat16
compute with full rematerialisation, FSDP over all devices (add tensor parallelism across nodes with
--config.mesh.tensor=N)."""
from configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/gpt3_xl"
    c.cpu_devices = 0
    c.model.name = "gpt3-xl"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.seq_len = 2048
    c.batch_size = 512
    c.steps = 24000  # ~25B tokens
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optimizer.update(dict(lr=2e-4, warmup_steps=375))
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 500
    c.eval_batches = 20
    return c
