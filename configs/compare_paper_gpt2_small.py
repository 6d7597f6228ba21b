"""The Celo2 paper's GPT-2 small task (``configs/paper_gpt2_small.py``) as a comparison of AdamW, Muon, Celo2 and
VeLO: 3-point lr sweeps (AdamW's centred on the paper's 4.8e-3), 3 seeds at the best rate, the held-out loss
every 250 steps on 4 batches for the curves and on 19.9M tokens after the last step (the verdict's). 2.47B
tokens per run."""
from configs.compare import compare_fields
from configs.paper_gpt2_small import get_config as paper_gpt2_small


def get_config():
    c = paper_gpt2_small()
    c.workdir = "runs/compare_paper_gpt2_small"
    c.eval_every = 250
    c.eval_batches = 4
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,velo",
        seeds=3,
        lrs={"adamw": "2.4e-3,4.8e-3,9.6e-3", "muon": "5e-3,1e-2,2e-2", "celo2": "5e-4,1e-3,2e-3", "velo": "1"})
    return c
