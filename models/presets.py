"""Model presets by name: the published GPT-2 and GPT-3 shapes, the Celo2 paper's modern-architecture GPT-2 small
and GPT-3 XL, and small models of each family for CPU work."""
from __future__ import annotations

import dataclasses

from models.gpt import FAMILIES, GPTConfig


def _shape(n_layers: int, d_model: int, n_heads: int, ctx: int, **fields) -> dict:
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, ctx=ctx, **fields)


# name: GPTConfig fields. Vocabulary 50257 (GPT-2 BPE) unless overridden; family gpt2 unless named.
PRESETS: dict[str, dict] = {
    "gpt2-small": _shape(12, 768, 12, 1024),
    "gpt2-medium": _shape(24, 1024, 16, 1024),
    "gpt2-large": _shape(36, 1280, 20, 1024),
    "gpt2-xl": _shape(48, 1600, 25, 1024),
    "gpt3-small": _shape(12, 768, 12, 2048),
    "gpt3-medium": _shape(24, 1024, 16, 2048),
    "gpt3-large": _shape(24, 1536, 16, 2048),
    "gpt3-xl": _shape(24, 2048, 16, 2048),
    # the Celo2 paper's pretraining tasks: GPT-2 small and GPT-3 XL shapes in its modern architecture
    "paper-gpt2-small": _shape(12, 768, 12, 1024, family="modern"),
    "paper-gpt3-xl": _shape(24, 2048, 16, 2048, family="modern"),
    # CPU-sized models (a few M parameters with a 4k-token vocabulary)
    "cpu-tiny": _shape(2, 128, 4, 256),
    "cpu-small": _shape(4, 256, 8, 256),
    "cpu-tiny-modern": _shape(2, 128, 4, 256, family="modern"),
    "cpu-small-modern": _shape(4, 256, 8, 256, family="modern"),
    "cpu-tiny-llama": _shape(2, 128, 4, 256, family="llama", n_kv_heads=2),
    "cpu-small-llama": _shape(4, 256, 8, 256, family="llama", n_kv_heads=4),
}


def model_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a preset; ``overrides`` replace fields (e.g. vocab_size, compute_dtype, remat, family)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown model config fields {bad}; valid fields: {sorted(fields)}")
    if overrides.get("family", "gpt2") not in FAMILIES:
        raise ValueError(f"model.family={overrides['family']!r} is not one of {', '.join(FAMILIES)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
