"""Model presets by name: the published GPT-2 and GPT-3 shapes, plus small models for CPU work."""
from __future__ import annotations

import dataclasses

from models.gpt import GPTConfig

# name: (n_layers, d_model, n_heads, ctx). Vocabulary 50257 (GPT-2 BPE) unless overridden.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "gpt2-small": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt2-large": (36, 1280, 20, 1024),
    "gpt2-xl": (48, 1600, 25, 1024),
    "gpt3-small": (12, 768, 12, 2048),
    "gpt3-medium": (24, 1024, 16, 2048),
    "gpt3-large": (24, 1536, 16, 2048),
    "gpt3-xl": (24, 2048, 16, 2048),
    # CPU-sized models (a few M parameters with a 4k-token vocabulary)
    "cpu-tiny": (2, 128, 4, 256),
    "cpu-small": (4, 256, 8, 256),
}


def model_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a preset; ``overrides`` replace fields (e.g. vocab_size, compute_dtype, remat)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    n_layers, d_model, n_heads, ctx = PRESETS[name]
    base = GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, ctx=ctx)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown model config fields {bad}; valid fields: {sorted(fields)}")
    return dataclasses.replace(base, **overrides)
