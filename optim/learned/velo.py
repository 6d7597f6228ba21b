"""VeLO (Metz et al. 2022, arXiv 2211.09760): a per-tensor LSTM that writes the weights of a per-element MLP.

A port of learned_optimization's ``HyperV2`` (``research/general_lopt/hyper_v2.py``) in the official
configuration (lstm_hidden_size 512, param_inits 256, ff_mult 100, use_bugged_next_lstm_state=False,
use_bugged_loss_features=False). Each step, with g clipped to +-1000 and the scalar training loss:

1. Hyper-network, one LSTM step with all T tensors (tree-leaf order) as the batch. Each tensor gives 30
   features: the training fraction t / num_steps, the loss history, and its *previous* m and rms. Then
       x <- Linear_2(x) + max_tensors relu(Linear_1(x));   h, c <- LSTM(x; h, c)
       controls = rnn_to_controls(h)   (256 per tensor);   lr_mult = step_size(h)   (1 per tensor)
2. Each tensor's MLP weights are W = ff_mult * mean_k(controls_k * ff_mod_stack_k) over the 256 stored sets.
3. Per element: the accumulators of Celo2 (rms decay 0.999) take g; 30 features are built from the
   *updated* ones, each channel scaled by rsqrt(1e-5 + mean(x^2)) over the whole tensor; an MLP
   30 -> 4 -> 4 -> 3 (ReLU) gives o, and

       step = o[0] * exp(0.001 o[1]) * RMS(p) * 0.001 * lr_mult,   RMS(p) = sqrt(mean(p^2) + 1e-9)
       p_new = p - step

VeLO sets its own step size: there is no learning rate. ``scale_by_velo`` returns ``-step``, the update
to *add* to the params (``optax.apply_updates``). It needs ``params`` and the loss (``loss=`` extra arg).

As in Celo2, the 30 features are never built for a whole tensor: two passes over blocks of rows (the
input-normalisation sums, then the MLP) keep the transient memory near the tensor's own size.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optim.learned.core import (ACCUMULATOR_LAYOUT, ADAFACTOR_DECAYS, CHUNK_ELEMS, FEATURE_WIDTHS, GRAD_CLIP,
                                MOMENTUM_DECAYS, accumulate, feature_blocks, fold_row_blocks, init_accumulators,
                                num_row_blocks, resolve_theta)
from optim.learned.velo_file import (LSTM_HIDDEN, LSTM_LINEAR, PARAM_INITS, check_velo_theta, load_velo_theta,
                                     save_velo_theta, velo_theta_shapes)
from optim.sharding import REPLICATED, register_state_layout

__all__ = ["ScaleByVeLOState", "scale_by_velo", "velo", "velo_leaf_step", "velo_tensor_mlps", "init_velo_theta",
           "load_velo_theta", "save_velo_theta", "init_velo_meta_theta"]

RMS_DECAYS = (0.999,)
RMS_EPS = 1e-6  # rsqrt(rms + eps) in the per-element features
INPUT_NORM_EPS = 1e-5  # per-channel input normalisation over the whole tensor
FF_MULT = 100.0  # scale of the interpolated MLP weights (hard-coded 100 in hyper_v2.py)
EXP_MULT = 1e-3  # step = d * exp(EXP_MULT * magnitude) * ...
STEP_MULT = 1e-3
PARAM_SCALE_EPS = 1e-9  # RMS(p) = sqrt(mean(p^2) + eps)
FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)  # tanh(10 (t/num_steps - tau))
FRACTION_SHARPNESS = 10.0
N_LOSS_EMAS = 10  # half-lives logspace(1, log10(num_steps), 10)
LOSS_MIN_INIT = 999999999999.0  # initial running minimum of the bias-corrected loss EMAs
LOSS_WARMUP = 2  # loss features are zero while fewer than 3 losses have been seen
TENSOR_NORM_EPS = 1e-9  # m, rms of a tensor are divided by sqrt(max(eps, mean(p^2))) for its features
LOG_FEATURE_SCALE = 10.0  # per-tensor statistics enter as clip(log(1e-8 + |10 v|), +-5) / 2
LOG_FEATURE_EPS = 1e-8
LOG_FEATURE_CLIP = 5.0
MAX_RANK = 5  # one-hot of the number of dims > 1; rank >= 5 gives all zeros (jax.nn.one_hot)
FORGET_BIAS = 1.0  # Haiku LSTM: f = sigmoid(f + 1)
HIGHEST = lax.Precision.HIGHEST  # the per-tensor hyper-network is tiny: run it in full float32 everywhere


class ScaleByVeLOState(NamedTuple):
    """State of ``scale_by_velo``. m, rms, v_row, v_col, v_diag have the tree structure of the params
    (shapes as in ``ScaleByCelo2State``: p.shape + (3,), p.shape + (1,), factored delete(p.shape, d) + (3,)).

    lstm_hidden, lstm_cell: [T, 512], one row per tensor in tree-leaf order.
    loss_means, loss_min:   [10] loss EMAs (zero init, no bias correction stored) and the running minimum
                            of their bias-corrected values. The EMA decays follow from num_steps.
    """
    iteration: jax.Array  # int32 scalar: updates done
    num_steps: jax.Array  # int32 scalar: planned length of training
    m: optax.Updates
    rms: optax.Updates
    v_row: optax.Updates
    v_col: optax.Updates
    v_diag: optax.Updates
    lstm_hidden: jax.Array
    lstm_cell: jax.Array
    loss_means: jax.Array
    loss_min: jax.Array


register_state_layout(ScaleByVeLOState, iteration=REPLICATED, num_steps=REPLICATED, lstm_hidden=REPLICATED,
                      lstm_cell=REPLICATED, loss_means=REPLICATED, loss_min=REPLICATED, **ACCUMULATOR_LAYOUT)


# --- per-tensor features and the hyper-network -----------------------------------------------------------


def _clip_log_abs(v):
    return jnp.clip(jnp.log(LOG_FEATURE_EPS + jnp.abs(v * LOG_FEATURE_SCALE)), -LOG_FEATURE_CLIP,
                    LOG_FEATURE_CLIP) * 0.5


def _fraction_features(iteration, num_steps):
    """tanh(10 (t / num_steps - tau)) for the 9 timescales tau; t counts the updates done before this one."""
    fraction = iteration / num_steps.astype(jnp.float32)
    return jnp.tanh((fraction - jnp.asarray(FRACTION_TIMESCALES, jnp.float32)) * FRACTION_SHARPNESS)


def _loss_decays(num_steps):
    """exp(-1 / half-life), half-lives logspace(1, log10(num_steps), 10) (use_bugged_loss_features=False)."""
    return jnp.exp(-1.0 / jnp.logspace(1.0, jnp.log10(num_steps.astype(jnp.float32)), N_LOSS_EMAS))


def _update_loss_emas(means, loss_min, decays, iteration, loss):
    """EMAs of the loss, clipped first to 2 |max of the bias-corrected EMAs| (the loss itself at step 0),
    and the running minimum of the bias-corrected EMAs."""
    correction = 1 - decays ** (iteration + 1)
    cap = jnp.where(iteration == 0, loss, jnp.max(means / correction))
    loss = jnp.minimum(jnp.abs(cap) * 2, loss)
    means = means * decays + loss * (1 - decays)
    return means, jnp.minimum(loss_min, means / correction)


def _loss_features(means, loss_min, decays, count):
    """9 features: EMA_i against the range [running min_i, EMA_(i+1)] of the next slower EMA (all bias
    corrected), (EMA_i - min_i) / max(1e-8, EMA_(i+1) - min_i) - 1 clipped to +-1; zero while count <= 2."""
    corrected = means / (1 - decays ** count)
    feature = (corrected[:-1] - loss_min[:-1]) / jnp.maximum(1e-8, corrected[1:] - loss_min[:-1]) - 1.0
    feature = jnp.clip(feature, -1, 1)
    return jnp.where(count <= LOSS_WARMUP, feature * 0, feature)


def _tensor_features(p, m, rms, fraction_features, loss_features):
    """The 30 LSTM inputs of one tensor, in the sorted key order of the official feature dict:
    fraction_left (9), loss_features (9), mean_rms (1), rank one-hot (5), var_m (3), var_rms (3).

    m and rms are first divided by sqrt(max(1e-9, mean(p^2))). var_rms is mean((rms - mean(m))^2): the
    official code subtracts the mean of m, not of rms, and the width-1 rms broadcasts against the 3 momenta,
    so var_rms has width 3 (kept: the official weights were trained with it).
    """
    axes = tuple(range(p.ndim))
    norm = lax.rsqrt(jnp.maximum(TENSOR_NORM_EPS, jnp.mean(jnp.square(p.astype(jnp.float32)))))
    m, rms = m.astype(jnp.float32) * norm, rms.astype(jnp.float32) * norm
    mean_m = jnp.mean(m, axes, keepdims=True)
    var_m = jnp.mean(jnp.square(m - mean_m), axes)
    var_rms = jnp.mean(jnp.square(rms - mean_m), axes)
    rank = jax.nn.one_hot(sum(d > 1 for d in p.shape), MAX_RANK, dtype=jnp.float32)
    return jnp.concatenate([fraction_features, loss_features, _clip_log_abs(jnp.mean(rms, axes)), rank,
                            _clip_log_abs(var_m), _clip_log_abs(var_rms)])


def _hyper_network(rnn, x, hidden, cell):
    """One step of the per-tensor network on x [T, 30] -> (controls [T, K], lr_mult [T], hidden, cell).

    Mixing (official bug kept: a first Linear "linear" is computed and discarded, so it has no effect):
    x <- Linear_2(x) + max over tensors of relu(Linear_1(x)). Then Haiku's LSTM: [i, g, f, o] =
    Linear([x, h]) split in this order, c <- sigmoid(f + 1) c + sigmoid(i) tanh(g), h <- sigmoid(o) tanh(c).
    """
    def linear(name, v):
        return jnp.dot(v, rnn[name]["w"], precision=HIGHEST) + rnn[name]["b"]

    x = linear("linear_2", x) + jnp.max(jax.nn.relu(linear("linear_1", x)), axis=0, keepdims=True)
    i, g, f, o = jnp.split(linear(LSTM_LINEAR, jnp.concatenate([x, hidden], -1)), 4, axis=-1)
    cell = jax.nn.sigmoid(f + FORGET_BIAS) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return linear("rnn_to_controls", hidden), linear("step_size", hidden)[:, 0], hidden, cell


# --- the per-element MLP ---------------------------------------------------------------------------------


def _feature_matrix(inputs):
    full = inputs[0].shape
    return jnp.concatenate([jnp.broadcast_to(b, full + b.shape[-1:]).astype(jnp.float32)
                            for b in feature_blocks(*inputs, rms_eps=RMS_EPS, vector_factored=True)], -1)


def _leaf_step(inputs, mlp, lr_mult, chunk_elems: int):
    """The VeLO step of one leaf (ndim >= 1) from inputs (g, p, m, rms, *fac), all with updated statistics,
    and its MLP weights (w0 [30, 4], b0, w1, b1, w2, b2). Runs over blocks of rows of axis 0."""
    p = inputs[1]
    axes = tuple(range(p.ndim))
    n_blocks = num_row_blocks(p.shape, 0, chunk_elems)

    def add_squares(total, block, j):
        return total + jnp.sum(jnp.square(_feature_matrix(block)), axes)

    squares = fold_row_blocks(add_squares, jnp.zeros(sum(FEATURE_WIDTHS), jnp.float32), inputs, 0, n_blocks)
    scale = lax.rsqrt(INPUT_NORM_EPS + squares / p.size)
    param_scale = jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))) + PARAM_SCALE_EPS)
    w0, b0, w1, b1, w2, b2 = mlp

    def put_step(out, block, j):
        h = jax.nn.relu((_feature_matrix(block) * scale) @ w0 + b0)
        o = jax.nn.relu(h @ w1 + b1) @ w2 + b2
        step = o[..., 0] * (param_scale * jnp.exp(EXP_MULT * o[..., 1])) * STEP_MULT * lr_mult
        return lax.dynamic_update_index_in_dim(out, step, j, 1)

    out = jnp.zeros((p.shape[0] // n_blocks, n_blocks) + p.shape[1:], jnp.float32)
    return fold_row_blocks(put_step, out, inputs, 0, n_blocks).reshape(p.shape)


# --- the transformation ----------------------------------------------------------------------------------


def _update_loss(params, loss, extra_args: dict):
    """The scalar training loss of an update, given as ``loss=`` or as learned_optimization's optax wrapper
    passes it, ``extra_args={"loss": loss}``; errors name what is missing."""
    if loss is None and isinstance(extra_args.get("extra_args"), Mapping):
        loss = extra_args["extra_args"].get("loss")
    if params is None:
        raise ValueError("VeLO needs params: update(grads, state, params, loss=loss); p is an input feature")
    if loss is None:
        raise ValueError("VeLO needs the scalar training loss at every step: update(grads, state, params, "
                         "loss=loss) or extra_args={'loss': loss} (in optax.chain, pass loss=... to the chain's "
                         "update)")
    if jnp.ndim(loss) != 0:
        raise ValueError(f"VeLO needs a scalar loss, got shape {jnp.shape(loss)}")
    return loss


def velo_leaf_step(g, p, m, rms, v_row, v_col, v_diag, *, mlp, lr_mult, chunk_elems: int = CHUNK_ELEMS):
    """One VeLO step of one leaf (ndim >= 1, g already clipped to +-1000): (-step, the new m, rms, v_row,
    v_col, v_diag). ``mlp``: the leaf's MLP weights (w0 [30, 4], b0, w1, b1, w2, b2) and ``lr_mult`` its step
    size, both written by the hyper-network (``velo_tensor_mlps``).

    With EMAs new = beta old + (1 - beta) x (zero init, no bias correction): m (decays 0.9, 0.99, 0.999) of g,
    rms (0.999) of g^2, Adafactor EMAs (0.9, 0.99, 0.999) of g^2 + 1e-30 factored over the two largest dims,
    or whole (v_diag) for ndim <= 1. The 30 per-element features (``feature_blocks`` with rsqrt(rms + 1e-6)
    and the factored blocks for vectors too) of the *updated* accumulators, each channel scaled by
    rsqrt(1e-5 + mean(x^2)) over the whole tensor, go through o = relu(relu(x w0 + b0) w1 + b1) w2 + b2, and

        step = o[0] exp(0.001 o[1]) RMS(p) 0.001 lr_mult,   RMS(p) = sqrt(mean(p^2) + 1e-9).
    """
    new_state, fac = accumulate(g, m, rms, v_row, v_col, v_diag, (MOMENTUM_DECAYS, RMS_DECAYS, ADAFACTOR_DECAYS))
    step = _leaf_step((g, p, *new_state[:2], *fac), mlp, lr_mult, chunk_elems)
    return [(-step).astype(p.dtype), *new_state]


def velo_tensor_mlps(theta, x, hidden, cell, *, ff_mult: float, param_inits: int):
    """The hyper-network's step for all T tensors: (per-tensor MLP weights, lr_mult [T], hidden, cell).

    ``x`` [T, 30]: the per-tensor features (``_tensor_features``). The LSTM (``_hyper_network``) gives 256
    controls per tensor, and each tensor's MLP weights are W = ff_mult * mean_k(controls_k * ff_mod_stack_k).
    The MLP weights come as a tuple of [T, ...] arrays (w0 with the 14 blocks joined, b0, w1, b1, w2, b2).
    """
    controls, lr_mult, hidden, cell = _hyper_network(theta["rnn_params"], x, hidden, cell)
    mlp = {k: jnp.einsum("tk,k...->t...", controls, w, precision=HIGHEST) * (ff_mult / param_inits)
           for k, w in theta["ff_mod_stack"]["~"].items()}
    w0 = jnp.concatenate([mlp[f"w0__{i}"] for i in range(len(FEATURE_WIDTHS))], axis=1)
    return (w0, mlp["b0"], mlp["w1"], mlp["b1"], mlp["w2"], mlp["b2"]), lr_mult, hidden, cell


def _lifted_leaves(trees, treedef):
    """Per leaf [g clipped to +-1000, p, m, rms, v_row, v_col, v_diag], a 0-d leaf's g, p, m, rms and v_diag
    lifted to shape (1,); and which leaves were 0-d."""
    leaves = [list(x) for x in zip(*(treedef.flatten_up_to(t) for t in trees))]
    scalar = [p.ndim == 0 for _, p, *_ in leaves]
    for x, is_scalar in zip(leaves, scalar):
        x[0] = jnp.clip(x[0], -GRAD_CLIP, GRAD_CLIP)
        if is_scalar:
            x[:4], x[6] = [a[None] for a in x[:4]], x[6][None]
    return leaves, scalar


def _squeezed(out, is_scalar):
    """A lifted 0-d leaf's outputs back to 0-d: step, m, rms and v_diag."""
    if is_scalar:
        out[:3], out[5] = [a[0] for a in out[:3]], out[5][0]
    return out


def _loss_step(state, loss):
    """(loss EMAs, their running minimum, the 9 loss features, the 9 training-fraction features) of a step."""
    loss_decays = _loss_decays(state.num_steps)
    loss_means, loss_min = _update_loss_emas(state.loss_means, state.loss_min, loss_decays, state.iteration,
                                             jnp.asarray(loss, jnp.float32))
    loss_features = _loss_features(loss_means, loss_min, loss_decays, state.iteration + 1)
    return loss_means, loss_min, loss_features, _fraction_features(state.iteration, state.num_steps)


def scale_by_velo(theta, num_steps: int | None = None, *, ff_mult: float = FF_MULT,
                  param_inits: int = PARAM_INITS, lstm_hidden_size: int = LSTM_HIDDEN,
                  chunk_elems: int = CHUNK_ELEMS) -> optax.GradientTransformationExtraArgs:
    """The VeLO rule (module docstring; docs/learned_optimizers.md#velo); ``update(grads, state, params, *,
    loss)`` returns -step (add it): ``velo_tensor_mlps`` once, then ``velo_leaf_step`` per leaf (scalars run
    as shape (1,)).

    theta: a dict (``init_velo_theta``, ``load_velo_theta``) or a path to a VeLO parameter file. num_steps: the
      planned number of updates; it sets the training fraction feature t / num_steps and the loss-EMA
      half-lives. ff_mult: 100 officially (the celo repo lowers it for stable meta-training). ``chunk_elems``
      only trades speed for transient memory.
    """
    if num_steps is None or int(num_steps) < 1:
        raise ValueError(f"VeLO needs num_steps >= 1, the planned number of training steps, got {num_steps}")
    sizes = dict(param_inits=param_inits, lstm_hidden_size=lstm_hidden_size)
    theta = resolve_theta(theta, partial(load_velo_theta, **sizes), partial(check_velo_theta, **sizes))

    def init_fn(params):
        n_tensors = len(jax.tree.leaves(params))
        init_state = theta["lstm_init_state"]
        return ScaleByVeLOState(
            iteration=jnp.zeros([], jnp.int32),
            num_steps=jnp.asarray(num_steps, jnp.int32),
            **init_accumulators(params, len(MOMENTUM_DECAYS), len(RMS_DECAYS), len(ADAFACTOR_DECAYS)),
            lstm_hidden=jnp.tile(init_state["hidden"], (n_tensors, 1)),
            lstm_cell=jnp.tile(init_state["cell"], (n_tensors, 1)),
            loss_means=jnp.zeros([N_LOSS_EMAS], jnp.float32),
            loss_min=jnp.full([N_LOSS_EMAS], LOSS_MIN_INIT, jnp.float32))

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        # optax passes every extra arg of a chain to each of its members: only the loss is read
        loss = _update_loss(params, loss, extra_args)
        treedef = jax.tree.structure(updates)
        trees = (updates, params, state.m, state.rms, state.v_row, state.v_col, state.v_diag)
        leaves, scalar = _lifted_leaves(trees, treedef)
        loss_means, loss_min, loss_features, fraction_features = _loss_step(state, loss)
        # The LSTM sees the accumulators before this step's gradient; the MLP the updated ones.
        x = jnp.stack([_tensor_features(p, m, rms, fraction_features, loss_features)
                       for _, p, m, rms, *_ in leaves])
        mlp, lr_mult, hidden, cell = velo_tensor_mlps(theta, x, state.lstm_hidden, state.lstm_cell,
                                                      ff_mult=ff_mult, param_inits=param_inits)
        outs = [_squeezed(velo_leaf_step(*leaf, mlp=[w[t] for w in mlp], lr_mult=lr_mult[t], chunk_elems=chunk_elems),
                          is_scalar) for t, (leaf, is_scalar) in enumerate(zip(leaves, scalar))]
        step, m, rms, v_row, v_col, v_diag = (treedef.unflatten([o[i] for o in outs]) for i in range(6))
        return step, ScaleByVeLOState(optax.safe_increment(state.iteration), state.num_steps, m, rms, v_row,
                                      v_col, v_diag, hidden, cell, loss_means, loss_min)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def velo(theta, num_steps: int | None = None, *, weight_decay: float = 0.0,
         **config: Any) -> optax.GradientTransformationExtraArgs:
    """VeLO as learned_optimization's prefab (``optax_lopt``) deploys it: the rule of ``scale_by_velo``
    (``config`` goes there) behind its WeightDecayWrapper, which feeds the rule

        g <- g + wd p,    loss <- loss + wd sum_leaves sum(p^2).

    The update is added to the params as is: VeLO has no learning rate. Not reproduced: the prefab's
    gradient accumulation over ceil(num_steps / 150k) steps for runs longer than 150k steps.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    rule = scale_by_velo(theta, num_steps, **config)
    if not weight_decay:
        return rule

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        loss = _update_loss(params, loss, extra_args)
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, updates, params)
        loss = loss + weight_decay * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return rule.update(grads, state, params, loss=loss)

    return optax.GradientTransformationExtraArgs(rule.init, update_fn)


def init_velo_theta(key: jax.Array, *, param_inits: int = PARAM_INITS,
                    lstm_hidden_size: int = LSTM_HIDDEN) -> dict:
    """Fresh VeLO theta (Haiku defaults, as ``HyperV2.init``): every Linear weight ~ N(0, 1/fan_in) truncated
    at +-2 sigma without variance correction, biases and the LSTM initial state zero. In ff_mod_stack each
    of the ``param_inits`` sets is drawn independently, with fan_in 30 (the whole input width) for every
    w0__i and 4 for w1, w2. (One draw for all weights, split in creation order: one compilation, not 25.)"""
    shapes = velo_theta_shapes(param_inits, lstm_hidden_size)

    def weights(node, path=()):  # (path, shape) of every weight ("w", "w0__i", "w1", "w2") in creation order
        if isinstance(node, dict):
            return [w for k, v in node.items() for w in weights(v, path + (k,))]
        return [(path, node)] if path[-1].startswith("w") else []

    found = weights(shapes)
    draws = jax.random.truncated_normal(key, -2.0, 2.0, (sum(math.prod(s) for _, s in found),), jnp.float32)
    parts = jnp.split(draws, list(itertools.accumulate(math.prod(s) for _, s in found))[:-1])
    drawn = {path: part.reshape(shape) / math.sqrt(sum(FEATURE_WIDTHS) if path[-1].startswith("w0") else shape[-2])
             for (path, shape), part in zip(found, parts)}

    def build(node, path=()):
        if isinstance(node, dict):
            return {k: build(v, path + (k,)) for k, v in node.items()}
        return drawn[path] if path in drawn else jnp.zeros(node, jnp.float32)

    return build(shapes)


def init_velo_meta_theta(key) -> dict:
    """The VeLO theta that meta-training starts from: learned_optimization's ``HyperV2.init`` (Haiku defaults,
    ``init_velo_theta``) except the ``step_size`` head, which is w = 0, b = 1 here.

    With Haiku's random head, lr_mult = step_size(h) is a random linear function of the LSTM state (about
    0.03 in size, of either sign), so a fresh VeLO takes steps of ~1e-4 of RMS(p) that may point uphill on a
    whole tensor. With lr_mult = 1 on every tensor, a fresh theta takes small, stable steps (about 6e-4 of
    RMS(p) per step on the 8x8 MLPs; held-out loss 1.66 after 1000 steps on fmnist_mlp32, from 2.37), whose
    size meta-training learns through one bias and whose dependence on the LSTM state it learns through w
    (whose gradient is nonzero, because h is)."""
    theta = init_velo_theta(key)
    head = theta["rnn_params"]["step_size"]
    theta["rnn_params"]["step_size"] = {"w": jnp.zeros_like(head["w"]), "b": jnp.ones_like(head["b"])}
    return theta
