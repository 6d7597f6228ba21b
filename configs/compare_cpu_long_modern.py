"""The long-horizon CPU comparison (``configs/compare_cpu_long.py``: 2000 steps of 8 x 128 tokens on Shakespeare
plus the King James Bible, AdamW, Muon, Celo2 and Celo2-base, the same grids and seeds) on the modern
architecture of the Celo2 paper at the same shape: ``cpu-tiny-modern`` (2 layers, d_model 128, 4 heads; RMSNorm
without scale, QK-norm, rotary positions, no biases, untied embeddings). Does the architecture change the
verdicts?"""
from configs.compare_cpu_long import get_config as gpt2_family_config


def get_config():
    c = gpt2_family_config()
    c.workdir = "runs/compare_cpu_long_modern"
    c.model.name = "cpu-tiny-modern"
    return c
