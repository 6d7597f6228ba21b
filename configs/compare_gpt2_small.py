"""Published-scale comparison: GPT-2 small (124M) for 2.5B tokens per run (4768 steps of 512 x 1024),
a 4-point lr sweep per optimizer and 3 seeds at the best rate. For a GPU/TPU cluster (about 40 runs of
~1.6e19 FLOPs each); launch it through launch/ with the same arguments."""
from configs.compare import compare_fields
from configs.gpt2_small import get_config as gpt2_small


def get_config():
    c = gpt2_small()
    c.workdir = "runs/compare_gpt2_small"
    c.steps = 4768
    c.eval_every = 250
    c.optimizer.warmup_steps = 240
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,velo",
        seeds=3,
        lrs={"adamw": "3e-4,6e-4,1.2e-3,2.4e-3", "muon": "5e-3,1e-2,2e-2,4e-2",
             "celo2": "3e-4,6e-4,1.2e-3,2.4e-3", "velo": "1"})
    return c
