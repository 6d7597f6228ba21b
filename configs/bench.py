"""The benchmark's run (``python -m tools.bench --config configs/bench.py``): a model preset's train step on
one simulated CPU device (mesh 1 x 1 x 1), 16 x 256 tokens at a fixed vocabulary of 4096 (the benchmark reads
no corpus for its timings; ``data.dir``, when it is prepared, feeds the input-pipeline numbers)."""
from configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/bench"  # nothing is written there: the benchmark trains no run
    c.model.name = "cpu-small"
    c.model.vocab_size = 4096
    c.model.vocab_multiple = 1
    c.cpu_devices = 1
    c.mesh.update(dict(data=1, fsdp=1, tensor=-1))
    c.steps = 100  # the length of the learning-rate schedule (and VeLO's horizon) the optimizers are built with
    return c
