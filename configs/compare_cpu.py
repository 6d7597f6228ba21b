"""The CPU optimizer comparison (``python -m train.compare --config configs/compare_cpu.py``): the 2-layer
GPT on Shakespeare, 400 steps of 16 x 128 tokens (0.8M tokens) per run on one CPU device, a learning-rate
sweep per optimizer at seed 0, then 3 seeds at each optimizer's best rate. About 40 minutes on 2 cores."""
from configs.base import base_config
from configs.compare import compare_fields


def get_config():
    c = base_config()
    c.workdir = "runs/compare_cpu"
    c.model.name = "cpu-tiny"
    c.cpu_devices = 1
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.steps = 400
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 20
    c.eval_every = 40
    c.eval_batches = 8
    c.checkpoint_every = 200
    c.keep_checkpoints = 1
    c.optimizer.warmup_steps = 20
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,celo2-base",
        seeds=3,
        lrs={
            "adamw": "1e-3,3e-3,1e-2,3e-2",
            "muon": "3e-3,1e-2,3e-2,1e-1",
            "celo2": "3e-4,1e-3,3e-3,1e-2",
            "celo2-base": "3e-4,1e-3,3e-3,1e-2",
        })
    return c
