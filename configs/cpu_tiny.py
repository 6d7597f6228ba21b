"""A 2-layer GPT for tests and quick experiments on CPU."""
from configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/cpu_tiny"
    c.model.name = "cpu-tiny"
    c.steps = 100
    c.batch_size = 8
    c.seq_len = 128
    c.eval_every = 50
    c.checkpoint_every = 50
    c.optimizer.warmup_steps = 10
    return c
