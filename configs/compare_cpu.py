"""The CPU optimizer comparison (``python -m tools.compare --config configs/compare_cpu.py``): the 2-layer
GPT on Shakespeare, 200 steps of 16 x 128 tokens (0.4M tokens) per run on one CPU device, a learning-rate
sweep per optimizer at seed 0 (3 points, widened where a best rate lay at an edge: Celo2 and Celo2-base 4,
AdamW 5; VeLO 5), then 3 seeds at each optimizer's best rate (31 runs, about 17 minutes on 2 cores). VeLO's
lr multiplies its own step (1 = VeLO as published)."""
from configs.base import base_config
from configs.compare import compare_fields


def get_config():
    c = base_config()
    c.workdir = "runs/compare_cpu"
    c.model.name = "cpu-tiny"
    c.cpu_devices = 1
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.steps = 200
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 20
    c.eval_every = 25
    c.eval_batches = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 1
    c.optimizer.warmup_steps = 10
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,celo2_base,velo",
        seeds=3,
        lrs={
            "adamw": "3e-4,1e-3,3e-3,1e-2,3e-2",
            "muon": "1e-2,3e-2,1e-1",
            "celo2": "3e-4,1e-3,3e-3,1e-2",
            "celo2_base": "1e-4,3e-4,1e-3,3e-3",
            "velo": "0.3,1,3,10,30",
        })
    return c
