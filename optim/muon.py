"""Muon for GPT pretraining: ``optax.contrib.muon`` configured for this project's parameter layout, with its
Newton-Schulz iterations placed on the mesh by ``optim.orthogonalize`` (replicated or distributed).

Routing: every weight with two or more axes except the embeddings goes to Muon, with the *last two axes*
as the matrix (reduction_axis = ndim-2, output_axis = ndim-1) and all leading axes as batch axes. With
the models' layout this orthogonalises per head for attention (``qkv [3, N, D, H]`` -> one D x H matrix per
q/k/v and head, ``out [N, H, D]`` -> one H x D matrix per head) and whole matrices for the MLP, as the
Celo2 paper's harness does. Embeddings (paths containing ``embed``), biases and norm parameters go to
the AdamW branch.

Composition: optax's ``scale_by_muon`` with zero Newton-Schulz steps gives the Nesterov momentum Frobenius-
normalised per matrix (its pre-normalisation); ``optim.orthogonalize`` then runs the iterations, where the
``Placement`` says. The chain and its state are those of ``optax.contrib.muon``, so checkpoints do not depend
on the placement.

Variant: optax's defaults, i.e. Nesterov momentum (beta 0.95) with bias correction, Newton-Schulz with
the quintic coefficients (3.4445, -4.7750, 2.0315) for 5 steps, Frobenius pre-normalisation, then the
shape scaling sqrt(max(1, fan_out / fan_in)) of Keller Jordan's reference Muon. With Nesterov on, optax's
AdamW branch is NAdamW. Weight decay is decoupled on the Muon matrices; the AdamW branch (embeddings and
vectors) is not decayed, because optax's muon applies one decay to the whole branch and decaying norm
scales and biases is not what GPT training does.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from optim.orthogonalize import QUINTIC_COEFFS, REPLICATED, Placement, newton_schulz, orthogonalize_matrices

NS_STEPS = 5


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


def scale_by_muon(*, beta: float, nesterov: bool, eps: float,
                  placement: Placement = REPLICATED) -> optax.GradientTransformation:
    """``optax.contrib.scale_by_muon`` (quintic Newton-Schulz, 5 steps, Frobenius pre-normalisation) with the
    iterations run by ``orthogonalize_matrices`` under ``placement``; the state is optax's ``MuonState``."""
    momentum = optax.contrib.scale_by_muon(QUINTIC_COEFFS, 0, beta, eps, nesterov=nesterov,
                                           weight_dimension_numbers=dimension_numbers)
    iterate = partial(newton_schulz, coeffs=QUINTIC_COEFFS, iters=NS_STEPS, eps=eps, normalize=False)

    def update_fn(updates, state, params=None):
        normalised, state = momentum.update(updates, state, params)
        return orthogonalize_matrices(normalised, iterate, placement), state

    return optax.GradientTransformation(momentum.init, update_fn)


def scale_by_shape() -> optax.GradientTransformation:
    """Keller Jordan's width scaling of each Muon matrix (optax's ``scale_by_shape`` for this routing):
    update * sqrt(max(1, fan_out / fan_in)), fan_in and fan_out the sizes of the last two axes."""
    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u: jnp.sqrt(jnp.maximum(1, u.shape[-1] / u.shape[-2])) * u, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate, adam_learning_rate, *, beta: float = 0.95, nesterov: bool = True,
         weight_decay: float = 0.0, adam_b1: float = 0.9, adam_b2: float = 0.95, eps: float = 1e-8,
         placement: Placement = REPLICATED):
    """``optax.contrib.muon``'s transformation with this project's routing (see module docstring): Muon
    (``scale_by_muon``, then the shape scaling of optax's (``scale_by_shape``), decoupled weight decay and the learning rate) on the
    matrices, NAdamW (with ``nesterov``) at ``adam_learning_rate`` on the rest."""
    return optax.partition({
        "muon": optax.chain(scale_by_muon(beta=beta, nesterov=nesterov, eps=eps, placement=placement),
                            scale_by_shape(),
                            optax.add_decayed_weights(weight_decay),
                            optax.scale_by_learning_rate(learning_rate)),
        "adam": optax.adamw(adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=0.0,
                            nesterov=nesterov),
    }, param_labels)
