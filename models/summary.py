"""Parameter shapes and counts computed abstractly (``nnx.eval_shape``: nothing is allocated)."""
from __future__ import annotations

import math

import jax
from flax import nnx

from models.gpt import GPT, GPTConfig


def abstract_params(cfg: GPTConfig):
    """(graphdef, nnx.State of abstract ``nnx.Param``s carrying their logical ``axes``)."""
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def count_params(cfg: GPTConfig) -> int:
    _, params = abstract_params(cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
