"""Published-scale comparison: GPT-3 XL (1.3B) for 5.0B tokens per run (4768 steps of 512 x 2048 tokens) with a
3-point lr sweep and 2 seeds at the best rate; for a multi-node GPU cluster or a TPU pod."""
from configs.compare import compare_fields
from configs.gpt3_xl import get_config as gpt3_xl


def get_config():
    c = gpt3_xl()
    c.workdir = "runs/compare_gpt3_xl"
    c.steps = 4768
    c.eval_every = 250
    c.optimizer.warmup_steps = 240
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,velo",
        seeds=2,
        lrs={"adamw": "1e-4,2e-4,4e-4", "muon": "5e-3,1e-2,2e-2", "celo2": "2e-4,5e-4,1e-3", "velo": "1"})
    return c
