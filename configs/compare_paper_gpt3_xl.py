"""The Celo2 paper's GPT-3 XL task (``configs/paper_gpt3_xl.py``) as a comparison of AdamW, Muon, Celo2 and VeLO:
3-point lr sweeps around each optimizer's usual rate (AdamW's centred on the paper's 2e-4), 2 seeds at the best
rate, the held-out loss every 500 steps on 2 batches for the curves and on 19.9M tokens after the last step
(what the verdict uses, as the paper's single evaluation). About 10B tokens per run: for a GPU cluster or TPU pod
(``launch/slurm_compare.sh``, ``launch/tpu_compare.sh``)."""
from configs.compare import compare_fields
from configs.paper_gpt3_xl import get_config as paper_gpt3_xl


def get_config():
    c = paper_gpt3_xl()
    c.workdir = "runs/compare_paper_gpt3_xl"
    c.eval_every = 500
    c.eval_batches = 2
    c.compare = compare_fields(
        optimizers="adamw,muon,celo2,velo",
        seeds=2,
        lrs={"adamw": "1e-4,2e-4,4e-4", "muon": "5e-3,1e-2,2e-2", "celo2": "2e-4,5e-4,1e-3", "velo": "1"})
    return c
