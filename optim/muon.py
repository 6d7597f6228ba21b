"""Muon for GPT pretraining: ``optax.contrib.muon`` configured for this project's parameter layout.

Routing: every weight with two or more axes except the embeddings goes to Muon, with the *last two axes*
as the matrix (reduction_axis = ndim-2, output_axis = ndim-1) and all leading axes as batch axes. With
the models' layout this orthogonalises per head for attention (``qkv [3, N, D, H]`` -> one D x H matrix per
q/k/v and head, ``out [N, H, D]`` -> one H x D matrix per head) and whole matrices for the MLP, as the
Celo2 paper's harness does. Embeddings (paths containing ``embed``), biases and norm parameters go to
the AdamW branch.

Variant: optax's defaults, i.e. Nesterov momentum (beta 0.95) with bias correction, Newton-Schulz with
the quintic coefficients (3.4445, -4.7750, 2.0315) for 5 steps, Frobenius pre-normalisation, then the
shape scaling sqrt(max(1, fan_out / fan_in)) of Keller Jordan's reference Muon. With Nesterov on, optax's
AdamW branch is NAdamW. Weight decay is decoupled on the Muon matrices; the AdamW branch (embeddings and
vectors) is not decayed, because optax's muon applies one decay to the whole branch and decaying norm
scales and biases is not what GPT training does.
"""
from __future__ import annotations

import jax
import optax
from optax.contrib import MuonDimensionNumbers


def dimension_numbers(params):
    """Muon matrix axes per leaf (None -> AdamW): last two axes of every non-embedding weight."""
    def dims(path, p):
        if p.ndim < 2 or "embed" in jax.tree_util.keystr(path):
            return None
        return MuonDimensionNumbers(reduction_axis=p.ndim - 2, output_axis=p.ndim - 1)

    return jax.tree_util.tree_map_with_path(dims, params)


def param_labels(params):
    """'muon' or 'adam' per leaf, as ``dimension_numbers`` routes them."""
    return jax.tree.map(lambda d: "adam" if d is None else "muon", dimension_numbers(params),
                        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))


def muon(learning_rate, adam_learning_rate, *, beta: float = 0.95, nesterov: bool = True,
         weight_decay: float = 0.0, adam_b1: float = 0.9, adam_b2: float = 0.95, eps: float = 1e-8):
    """``optax.contrib.muon`` with this project's routing (see module docstring)."""
    return optax.contrib.muon(
        learning_rate, beta=beta, nesterov=nesterov, eps=eps, weight_decay=weight_decay,
        adam_b1=adam_b1, adam_b2=adam_b2, adam_weight_decay=0.0, adam_learning_rate=adam_learning_rate,
        muon_weight_dimension_numbers=dimension_numbers)
