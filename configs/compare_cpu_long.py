"""The long-horizon CPU optimizer comparison (``python -m tools.compare --config configs/compare_cpu_long.py``):
the 2-layer GPT of ``compare_cpu.py`` trained 10x as many steps, 2000 steps of 8 x 128 tokens (2.05M tokens) per
run, on Shakespeare plus the King James Bible (2.79M training tokens at vocabulary 4096), so every run stays
within one epoch (0.73) and measures optimisation rather than memorisation. AdamW, Muon, Celo2 and Celo2-base,
each swept around its best rate of the 200-step comparison at seed 0 (3 points; AdamW's grid widened to 4 and
Celo2's to 5 because their best rates lay at an edge), then the best rate at seeds 1 and 2 (23 runs, about 55
minutes on 2 cores). The batch is half of ``compare_cpu.py``'s: 16 x 128 x 2000 would be 1.5 epochs of this
corpus."""
from configs.compare import compare_fields
from configs.compare_cpu import get_config as short_horizon_config


def get_config():
    c = short_horizon_config()
    c.workdir = "runs/compare_cpu_long"
    c.data.corpus = "shakespeare+kjv"
    c.data.dir = "data_cache/shakespeare-kjv-bpe4096"
    c.steps = 2000
    c.batch_size = 8
    c.log_every = 50
    c.eval_every = 100
    c.eval_batches = 16
    c.checkpoint_every = 500
    c.optimizer.warmup_steps = 100
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,celo2_base",
        seeds=3,
        lrs={
            "adamw": "1e-3,3e-3,1e-2,3e-2",
            "muon": "1e-2,3e-2,1e-1",
            "celo2": "1e-4,3e-4,1e-3,3e-3,1e-2",
            "celo2_base": "1e-4,3e-4,1e-3",
        })
    return c
