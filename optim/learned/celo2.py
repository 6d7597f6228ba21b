"""Celo2: a learned per-element MLP update rule, orthogonalised and RMS-normalised (arXiv 2602.19142).

For every parameter leaf p with gradient g (clipped elementwise to +-1000), Celo2 keeps EMAs of g
(3 decays), of g^2 (1 decay) and Adafactor-style factored EMAs of g^2 (3 decays), builds 30 features per
element (15 for vectors and scalars), normalises each feature channel by its RMS over the last two axes of
p, and maps them with a 30 -> 8 -> 8 -> 3 MLP (weights "theta", shared by all elements) to a direction d:

    d    = MLP(features)[..., 0]
    d    = NewtonSchulz5(d)                    over the last two axes, Celo2 only, ndim >= 2
    step = d / sqrt(1e-9 + mean(d^2))          per slice of the last two axes: every slice has RMS 1

``scale_by_celo2`` returns that step (before the learning rate). ``celo2`` is the harness used to train
with it: the learned rule on matrices and N-d tensors, AdamW on vectors and embeddings. ``celo2_base``
runs the rule without Newton-Schulz on every leaf. The math: docs/learned_optimizers.md#celo2 and
#celo2-base; conformance with the official code: #conformance.

Memory and speed: the 30 features are never built for a whole tensor (2048 x 8192 x 30 floats would be
2 GB). Two passes over blocks of rows (``chunk_elems`` elements each) rebuild the cheap elementwise features
per block: the first sums their squares for the input normalisation, the second runs the MLP. The 12
channels of factored row/column statistics are constant along a row or a column: their normalisation and
first-layer term are computed at the size of the statistic and broadcast, so per element only 18 channels
(15 for vectors) are built, stacked channels-first and fed to the MLP as three matmuls whose long axis is
the elements. The transient memory is about 2x the tensor plus ~35 floats per block element; the result is
the unchunked math up to float32 summation order. Blocks take every k-th row, so on a row-sharded tensor
each block is spread over all shards: no all-gather. On CPU the blocks are cache-sized (``CPU_CHUNK_ELEMS``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optim.learned.core import (ACCUMULATOR_LAYOUT, ADAFACTOR_DECAYS, CHUNK_ELEMS, CPU_CHUNK_ELEMS, FEATURE_WIDTHS,
                                GRAD_CLIP, MOMENTUM_DECAYS, RSQRT_EPS, accumulate, factored_dims, feature_blocks,
                                fold_row_blocks, init_accumulators, num_row_blocks, resolve_theta)
from optim.orthogonalize import QUINTIC_COEFFS, REPLICATED as IN_PLACE, Placement, newton_schulz, orthogonalize_matrices
from optim.sharding import REPLICATED, register_state_layout
from optim.learned.celo2_file import THETA_SHAPES, check_theta, load_theta, save_theta, theta_from_bytes, theta_to_bytes

__all__ = ["ScaleByCelo2State", "Celo2Rule", "celo2_rule", "celo2_leaf_direction", "scale_by_celo2", "celo2",
           "celo2_base", "param_labels", "factored_dims", "init_theta", "init_theta_from_feature", "load_theta",
           "save_theta", "theta_from_bytes", "theta_to_bytes"]

RMS_DECAYS = (0.95,)
NORM_EPS = 1e-9  # input-feature and output RMS normalisation
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


class ScaleByCelo2State(NamedTuple):
    """State of ``scale_by_celo2``. Every field but ``iteration`` has the tree structure of the params.

    m:      p.shape + (3,)              momentum EMAs, p's dtype
    rms:    p.shape + (1,)              EMA of g^2, p's dtype
    v_row:  delete(p.shape, d0) + (3,)  factored EMAs of mean(g^2, axis=d0), float32; (0, 3) if ndim <= 1
    v_col:  delete(p.shape, d1) + (3,)  factored EMAs of mean(g^2, axis=d1), float32; (0, 3) if ndim <= 1
    v_diag: p.shape + (3,)              EMAs of g^2 for ndim <= 1, float32; (0, 3) placeholder otherwise
    with (d1, d0) the indices of the second-largest and largest dims. The official implementation also
    counts steps per accumulator (MomAccumulator.t, ...); the math never reads them, so they are omitted.
    """
    iteration: jax.Array  # int32 scalar
    m: optax.Updates
    rms: optax.Updates
    v_row: optax.Updates
    v_col: optax.Updates
    v_diag: optax.Updates


register_state_layout(ScaleByCelo2State, iteration=REPLICATED, **ACCUMULATOR_LAYOUT)


def _last_two_axes(p) -> tuple:
    return tuple(range(max(p.ndim - 2, 0), p.ndim))


def _rms_normalizer(x, axes):
    return lax.rsqrt(NORM_EPS + jnp.mean(jnp.square(x), axes, keepdims=True))


def _channels(g, p, m, rms, *fac):
    """The MLP's input channels in the order of w0's rows (30, or 15 for ndim <= 1): the columns of the
    feature blocks (``feature_blocks``), each broadcastable to g.shape."""
    return [b[..., k] for b in feature_blocks(g, p, m, rms, *fac, rms_eps=RSQRT_EPS) for k in range(b.shape[-1])]


def _first_layer_terms(stats, axes, w0_rows):
    """The first-layer contribution of the broadcast channels (factored row and column statistics) per
    shape: sum_x x rsqrt(1e-9 + mean(x^2)) w0_x over the channels x of that shape, hidden last.

    A channel broadcast along an axis has the same mean square as its unbroadcast values, so these terms
    cost O(rows + cols) and are broadcast into the per-element first layer instead of entering its matmul.
    Each is a matmul, which XLA materialises rather than fusing (and so recomputing) it into every element.
    """
    terms = []
    for shape in dict.fromkeys(x.shape for x in stats):
        rows = [i for i, x in enumerate(stats) if x.shape == shape]
        x = jnp.stack([stats[i].astype(jnp.float32) for i in rows], -1)
        terms.append((x * _rms_normalizer(x, axes)) @ w0_rows[np.array(rows)])
    return terms


class Celo2Rule(NamedTuple):
    """The static settings of one Celo2 rule (``scale_by_celo2``'s keywords, validated by ``celo2_rule``)."""
    orthogonalize: bool
    decays: tuple  # (momentum, rms, adafactor) EMA decays
    exp_mult: float
    rmsmult: float
    act: Callable
    ns_coeffs: tuple
    ns_iters: int
    ns_eps: float
    chunk_elems: int | None


def celo2_rule(orthogonalize: bool = True, initial_momentum_decays=MOMENTUM_DECAYS, initial_rms_decays=RMS_DECAYS,
               initial_adafactor_decays=ADAFACTOR_DECAYS, exp_mult: float = 0.0, rmsmult: float = 1.0,
               mlp_activation: str = "relu", ns_coeffs=QUINTIC_COEFFS, ns_iters: int = 5, ns_eps: float = 1e-8,
               chunk_elems: int | None = None) -> Celo2Rule:
    """The ``Celo2Rule`` of ``scale_by_celo2``'s keywords; ValueError for decays that do not match theta's input
    widths or an unknown activation."""
    for name, decays, n in [("initial_momentum_decays", initial_momentum_decays, 3),
                            ("initial_rms_decays", initial_rms_decays, 1),
                            ("initial_adafactor_decays", initial_adafactor_decays, 3)]:
        if len(decays) != n:
            raise ValueError(f"{name} must have {n} entries to match theta's input widths, got {decays}")
    if mlp_activation not in ACTIVATIONS:
        raise ValueError(f"mlp_activation must be one of {sorted(ACTIVATIONS)}, got {mlp_activation!r}")
    return Celo2Rule(orthogonalize, (initial_momentum_decays, initial_rms_decays, initial_adafactor_decays),
                     exp_mult, rmsmult, ACTIVATIONS[mlp_activation], ns_coeffs, ns_iters, ns_eps, chunk_elems)


def mlp_direction(channels, scales, terms, w_dense, theta, *, act, exp_mult: float):
    """d = o[0] exp(exp_mult o[1]) for one block of rows, with

        h = act(act(sum_x x s_x w0_x + terms + b0) w1 + b1),   o = h w2 + b2

    over the per-element ``channels`` x and their normalisers s_x (``scales``); ``terms`` (broadcast, hidden
    last) are the first-layer terms of the factored statistics (``_first_layer_terms``). The channels are
    stacked on a leading axis (channels-major, so each layer is one matmul with the elements as its long
    axis). With exp_mult 0 the magnitude output o[1] is not computed (exp(0 o[1]) = 1)."""
    n_out = 1 if exp_mult == 0 else 2
    x = jnp.stack([c.astype(jnp.float32) * s for c, s in zip(channels, scales)])
    col = lambda v: v.reshape(v.shape[:1] + (1,) * (x.ndim - 1))
    h = jnp.tensordot(w_dense.T, x, 1) + col(theta["b0"])
    h = act(h + sum(jnp.moveaxis(t, -1, 0) for t in terms))
    h = act(jnp.tensordot(theta["w1"].T, h, 1) + col(theta["b1"]))
    o = jnp.tensordot(theta["w2"][:, :n_out].T, h, 1) + col(theta["b2"][:n_out])
    return o[0] if n_out == 1 else o[0] * jnp.exp(exp_mult * o[1])


def _add_squares(sums, block, j, *, dense, axes):
    """sums + sum(x^2) over ``axes`` of the per-element channels ``dense`` of one block of rows."""
    channels = _channels(*block)
    return sums + jnp.stack([jnp.sum(jnp.square(channels[i].astype(jnp.float32)), axes, keepdims=True)
                             for i in dense])


def _put_direction(out, block, j, *, n_inputs, dense, scales, w_dense, theta, rule, axis):
    """``out`` with the direction of block j of rows (``mlp_direction``) written at index j of ``axis + 1``."""
    channels = _channels(*block[:n_inputs])
    d = mlp_direction([channels[i] for i in dense], scales, block[n_inputs:], w_dense, theta, act=rule.act,
                      exp_mult=rule.exp_mult)
    return lax.dynamic_update_index_in_dim(out, d, j, axis + 1)


def celo2_direction(inputs, theta, w0, rule: Celo2Rule):
    """The MLP's direction d for one leaf (ndim >= 1) from ``inputs`` = (g, p, m, rms, *fac) with updated
    statistics: every input channel x becomes x rsqrt(1e-9 + mean(x^2)) over the last two axes of p, then
    ``mlp_direction``. ``w0``: the rows w0__0..w0__13 stacked.

    Channels of p's full shape are per-element; the others are broadcast factored statistics, whose
    normalisation and first-layer term are computed at their own size (the full ones, unused here, are dropped
    by XLA). Features exist for at most ~chunk_elems elements at a time: the input normalisation of the dense
    channels and the MLP both run over blocks of rows along the first of the last two axes.
    """
    p = inputs[1]
    axes = _last_two_axes(p)  # input and output normalisation
    whole = _channels(*inputs)
    dense = [i for i, c in enumerate(whole) if c.shape == p.shape]
    stats = [i for i, c in enumerate(whole) if c.shape != p.shape]
    terms = _first_layer_terms([whole[i] for i in stats], axes, w0[np.array(stats, int)])
    w_dense = w0[np.array(dense, int)]
    n_rows = num_row_blocks(p.shape, axes[0], rule.chunk_elems or (
        CPU_CHUNK_ELEMS if jax.default_backend() == "cpu" else CHUNK_ELEMS))
    kept = tuple(1 if a in axes else n for a, n in enumerate(p.shape))
    sums = fold_row_blocks(partial(_add_squares, dense=dense, axes=axes),
                           jnp.zeros((len(dense),) + kept, jnp.float32), inputs, axes[0], n_rows)
    scales = lax.rsqrt(NORM_EPS + sums / math.prod(p.shape[a] for a in axes))
    blocked = p.shape[:axes[0]] + (p.shape[axes[0]] // n_rows, n_rows) + p.shape[axes[0] + 1:]
    put = partial(_put_direction, n_inputs=len(inputs), dense=dense, scales=scales, w_dense=w_dense, theta=theta,
                  rule=rule, axis=axes[0])
    d = jnp.zeros(blocked, jnp.float32)
    return fold_row_blocks(put, d, (*inputs, *terms), axes[0], n_rows).reshape(p.shape)


def celo2_leaf_direction(g, p, m, rms, v_row, v_col, v_diag, *, theta, w0, rule: Celo2Rule):
    """The MLP's direction of one leaf before Newton-Schulz: (d float32, new m, rms, v_row, v_col, v_diag).

    With g <- clip(g, -1000, 1000) and EMAs new = beta old + (1 - beta) x (zero init, no bias correction):
    m (3 decays) of g, rms (1 decay) of g^2, and Adafactor EMAs of g^2 + 1e-30 factored over the two largest
    dims (v_row, v_col) or, for ndim <= 1, kept whole (v_diag). With G = g, R = rsqrt(rms + 1e-8), the
    feature blocks are, in order (w0__0..w0__13):
      G, clip(G, +-0.1), p, m, rms, m R, R, fac_g, G R, row, col, rsqrt(row + 1e-8), rsqrt(col + 1e-8), m rf cf
    where fac_g = G rf cf (Adafactor-normalised g; G rsqrt(v_diag + 1e-9) for vectors), rf/cf are the row and
    column factors rsqrt(max(v_row / (mean(v_row) + 1e-9), 1e-9)), rsqrt(max(v_col, 1e-9)), and row/col are
    v_row/v_col broadcast to p's shape. Vectors and scalars use blocks 0-8 only. Each channel x becomes
    x rsqrt(1e-9 + mean(x^2)) over the last two axes of p, then

        h = act(act(sum_i x_i w0__i + b0) w1 + b1);  o = h w2 + b2;  d = o[..., 0] exp(exp_mult o[..., 1])

    with the means over the last two axes. A scalar leaf runs as shape (1,). ``scale_by_celo2`` finishes the
    step: d <- NS(d) if orthogonalize and ndim >= 2; step = rmsmult d rsqrt(1e-9 + mean(d^2)).
    """
    if p.ndim == 0:  # run as shape (1,) and squeeze back
        d, m, rms, v_row, v_col, v_diag = celo2_leaf_direction(g[None], p[None], m[None], rms[None], v_row, v_col,
                                                               v_diag[None], theta=theta, w0=w0, rule=rule)
        return d[0], m[0], rms[0], v_row, v_col, v_diag[0]
    g = jnp.clip(g, -GRAD_CLIP, GRAD_CLIP)
    new_state, fac = accumulate(g, m, rms, v_row, v_col, v_diag, rule.decays)
    return (celo2_direction((g, p, *new_state[:2], *fac), theta, w0, rule), *new_state)


def scale_by_celo2(theta, *, orthogonalize: bool = True, placement: Placement = IN_PLACE,
                   **rule_config: Any) -> optax.GradientTransformation:
    """The Celo2 learned rule; ``update(grads, state, params)`` returns the step before the learning rate
    (docs/learned_optimizers.md#celo2): ``celo2_leaf_direction`` per leaf, Newton-Schulz on the leaves with
    two or more axes (``optim.orthogonalize``, run where ``placement`` says), then the RMS normalisation

        step = rmsmult d rsqrt(1e-9 + mean(d^2))      (mean over the last two axes)

    ``theta``: a dict or the path of a theta.state file (``load_theta``). ``rule_config``: the keywords of
    ``celo2_rule`` (initial_momentum_decays, initial_rms_decays, initial_adafactor_decays, exp_mult, rmsmult,
    mlp_activation, ns_coeffs, ns_iters, ns_eps, chunk_elems). ``chunk_elems`` only trades speed for transient
    memory; results are the same. Without Newton-Schulz (``orthogonalize=False``) this is Celo2-base's rule.
    """
    theta = resolve_theta(theta, load_theta, check_theta)
    rule = celo2_rule(orthogonalize, **rule_config)
    w0 = jnp.concatenate([theta[f"w0__{i}"] for i in range(len(FEATURE_WIDTHS))])
    momentum, rms, adafactor = rule.decays

    def init_fn(params):
        return ScaleByCelo2State(iteration=jnp.zeros([], jnp.int32), **init_accumulators(
            params, len(momentum), len(rms), len(adafactor)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_celo2 needs params: the parameter value is an input feature of the rule")
        treedef = jax.tree.structure(updates)
        trees = (updates, params, state.m, state.rms, state.v_row, state.v_col, state.v_diag)
        outs = [celo2_leaf_direction(*leaves, theta=theta, w0=w0, rule=rule)
                for leaves in zip(*(treedef.flatten_up_to(t) for t in trees))]
        d, m, rms, v_row, v_col, v_diag = (treedef.unflatten([o[i] for o in outs]) for i in range(6))
        if rule.orthogonalize:
            d = orthogonalize_matrices(d, partial(newton_schulz, coeffs=rule.ns_coeffs, iters=rule.ns_iters,
                                                  eps=rule.ns_eps), placement)
        step = jax.tree.map(lambda d, p: (rule.rmsmult * d * _rms_normalizer(d, _last_two_axes(p))).astype(p.dtype),
                            d, params)
        return step, ScaleByCelo2State(optax.safe_increment(state.iteration), m, rms, v_row, v_col, v_diag)

    return optax.GradientTransformation(init_fn, update_fn)


def param_labels(params):
    """'adam' for leaves with ndim <= 1 or 'embed' in their key path, else 'celo2'
    (docs/learned_optimizers.md#celo2-as-deployed)."""
    def label(path, p):
        return "adam" if len(p.shape) <= 1 or "embed" in jax.tree_util.keystr(path) else "celo2"
    return jax.tree_util.tree_map_with_path(label, params)


def celo2(learning_rate: optax.ScalarOrSchedule, theta, *, weight_decay: float = 0.0,
          mult_1d: float = 20.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          placement: Placement = IN_PLACE, **celo2_config: Any) -> optax.GradientTransformation:
    """Celo2 as deployed (docs/learned_optimizers.md#celo2-as-deployed): leaves labelled by ``param_labels``.

    'celo2' leaves: p <- p - lr_t (scale_by_celo2(orthogonalize=True) + wd p).
    'adam' leaves:  optax.adamw(mult_1d lr_t, b1, b2, eps, weight_decay=wd) (bias-corrected).
    """
    adam_lr = ((lambda count: mult_1d * learning_rate(count)) if callable(learning_rate)
               else mult_1d * learning_rate)
    return optax.partition({
        "celo2": optax.chain(scale_by_celo2(theta, orthogonalize=True, placement=placement, **celo2_config),
                             optax.add_decayed_weights(weight_decay),
                             optax.scale_by_learning_rate(learning_rate)),
        "adam": optax.adamw(adam_lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    }, param_labels)


def celo2_base(learning_rate: optax.ScalarOrSchedule, theta, *, weight_decay: float = 0.0,
               **celo2_config: Any) -> optax.GradientTransformation:
    """Celo2-base (docs/learned_optimizers.md#celo2-base): on every leaf,
    p <- p - lr_t (scale_by_celo2(orthogonalize=False) + wd p)."""
    return optax.chain(scale_by_celo2(theta, orthogonalize=False, **celo2_config),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def init_theta(key: jax.Array) -> dict:
    """Fresh theta for meta-training (Haiku init): weights ~ N(0, 1/fan_in) truncated at +-2 sigma without
    variance correction, fan_in = 30 (the whole input width) for every w0__i and 8 for w1, w2; zero biases."""
    weights = [k for k in THETA_SHAPES if k.startswith("w")]
    keys = dict(zip(weights, jax.random.split(key, len(weights))))
    fan_in = {k: (sum(FEATURE_WIDTHS) if k.startswith("w0") else THETA_SHAPES[k][0]) for k in weights}
    return {k: (jax.random.truncated_normal(keys[k], -2.0, 2.0, shape, jnp.float32) / math.sqrt(fan_in[k])
                if k in keys else jnp.zeros(shape, jnp.float32)) for k, shape in THETA_SHAPES.items()}


def init_theta_from_feature(key: jax.Array, block: int, channel: int = 0) -> dict:
    """A theta whose rule is exactly ``d = x``, channel ``channel`` of feature block ``block``
    (docs/learned_optimizers.md#features, after the input normalisation), with the rest of the network alive
    for meta-training to build on.

    Hidden units 0 and 1 of both layers carry x through the ReLUs, d = relu(x) - relu(-x) = x:
    w0__block[channel, :2] = (1, -1), w1[:2, :2] = I, w2[:2, 0] = (1, -1), and nothing else feeds them or
    the direction (zeros in w0[:, :2] elsewhere, w1[2:, :2], w2[2:, 0], b0[:2], b1[:2], b2[0]). Units 2-7
    keep ``init_theta``'s random weights, so a perturbation of w2[2:, 0] changes d at once. Block 3, channel
    0 (momentum, beta 0.9) gives, after Newton-Schulz and the RMS normalisation, Muon's direction with an
    RMS-1 step; block 5, channel 0 (m / sqrt(v)) gives Adam's direction without bias correction."""
    if not 0 <= block < len(FEATURE_WIDTHS) or not 0 <= channel < FEATURE_WIDTHS[block]:
        raise ValueError(f"feature block {block} channel {channel} does not exist; blocks 0-"
                         f"{len(FEATURE_WIDTHS) - 1} have widths {FEATURE_WIDTHS}")
    theta = {k: np.array(v) for k, v in init_theta(key).items()}
    for i in range(len(FEATURE_WIDTHS)):
        theta[f"w0__{i}"][:, :2] = 0.0
    theta[f"w0__{block}"][channel, :2] = (1.0, -1.0)
    theta["b0"][:2] = 0.0
    theta["w1"][:, :2] = 0.0
    theta["w1"][:2, :2] = np.eye(2)
    theta["b1"][:2] = 0.0
    theta["w2"][:, 0] = 0.0
    theta["w2"][:2, 0] = (1.0, -1.0)
    theta["b2"][0] = 0.0
    return {k: jnp.asarray(v) for k, v in theta.items()}
