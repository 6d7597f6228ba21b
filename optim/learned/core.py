"""The per-element machinery shared by the learned optimizers (Celo2, Celo2-base and VeLO; see
docs/learned_optimizers.md#accumulators and #features): gradient accumulators and their sharding, the 14
feature blocks built from them (``FEATURE_WIDTHS``, the first-layer widths of both networks), blocks of rows
that bound the transient memory, state initialisation and the resolution of a theta argument.

Per leaf, with g clipped to +-1000 and EMAs new = beta old + (1 - beta) x (zero init, no bias correction):
m (3 decays) of g, rms (1 decay) of g^2, and Adafactor EMAs of g^2 + 1e-30 factored over the two largest
dims (v_row, v_col) or, for ndim <= 1, kept whole (v_diag).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optim.sharding import TRAILING, drop_axis

WEIGHTS_DIR = Path(__file__).parent / "weights"  # shipped weights: celo2.state, celo2_base.state, velo.state

# Widths of the 14 per-element feature blocks (``feature_blocks``), in the order of the first-layer keys
# w0__0..w0__13 of Celo2's MLP and of VeLO's per-element MLPs.
FEATURE_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0  # elementwise clip of the incoming gradient
FEATURE_CLIP = 0.1  # the "clipped g" feature
GSQ_EPS = 1e-30  # added to g^2 in the factored accumulators
FACTOR_EPS = 1e-9  # floor inside the factored rsqrt, and eps of the row-mean normaliser
RSQRT_EPS = 1e-8  # rsqrt(row/col stat + eps); Celo2's rsqrt(rms + eps)
CHUNK_ELEMS = 2**18  # elements per MLP block on accelerators; bounds the transient feature memory
CPU_CHUNK_ELEMS = 2**16  # on CPU: blocks whose features stay in cache (2.6x faster than 2**18 on 256 x 1024)


def factored_dims(shape) -> tuple[int, int] | None:
    """(d1, d0): indices of the second-largest and the largest dim, None for ndim < 2. Ties resolve as a
    stable argsort (as NumPy's default sort does on such short arrays): (n, n) -> (0, 1)."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    return int(order[-2]), int(order[-1])


def factored_shapes(shape: tuple, k: int):
    """Shapes of (v_row, v_col, v_diag) for a leaf of ``shape`` and k decays; (0, k) marks an unused one."""
    dims = factored_dims(shape)
    if dims is None:
        return (0, k), (0, k), shape + (k,)
    d1, d0 = dims
    return shape[:d0] + shape[d0 + 1:] + (k,), shape[:d1] + shape[d1 + 1:] + (k,), (0, k)


def _diag_layout(p_shape: tuple, p_spec: tuple) -> tuple:
    """v_diag: p.shape + (k,) for ndim <= 1, else a (0, k) placeholder."""
    return p_spec + (None,) if len(p_shape) <= 1 else (None, None)


def _factored_axis(which: int):
    """The axis of p that v_row (which=1: the largest, d0) or v_col (which=0: d1) averages over."""
    return lambda shape: None if factored_dims(shape) is None else factored_dims(shape)[which]


# How the per-element accumulators shard, relative to their parameter (optim.sharding); shared with VeLO.
ACCUMULATOR_LAYOUT = dict(m=TRAILING, rms=TRAILING, v_row=drop_axis(_factored_axis(1)),
                          v_col=drop_axis(_factored_axis(0)), v_diag=_diag_layout)


def _ema(old, x, decays):
    """beta * old + (1 - beta) * x per decay (last axis), with beta in float32 and the result in old's dtype."""
    beta = jnp.asarray(decays, jnp.float32)
    return (beta * old + (1 - beta) * x).astype(old.dtype)


def feature_blocks(g, p, m, rms, *fac, rms_eps: float, vector_factored: bool = False):
    """The 14 per-element feature blocks (w0__0..w0__13; docs/learned_optimizers.md#features), each broadcastable to
    g.shape + (width,): the factored statistics keep their size-1 axes. With R = rsqrt(rms + rms_eps):

        G, clip(G, +-0.1), p, m, rms, m R, R, fac_g, G R, row, col, rsqrt(row + 1e-8), rsqrt(col + 1e-8), m rf cf

    ``fac`` is (row_factor, col_factor, v_row, v_col), each expanded back to the rank of p, or (v_diag,) for
    vectors, whose fac_g is G rsqrt(max(v_diag + 1e-9, 1e-9)) and which have blocks 0-8 only (Celo2) or, with
    ``vector_factored`` (VeLO), blocks 9-13 made of v_diag: v, v, rsqrt(v + 1e-8), rsqrt(v + 1e-8), m v^-1/2.
    The inputs may be whole leaves or matching row blocks of them.
    """
    G = g[..., None]
    R = lax.rsqrt(rms + rms_eps)
    if len(fac) == 4:
        row_factor, col_factor, row, col = fac
        fac_g = G * row_factor * col_factor
        factored = [row, col, lax.rsqrt(row + RSQRT_EPS), lax.rsqrt(col + RSQRT_EPS), m * row_factor * col_factor]
    else:
        (v,) = fac
        fac_g = G * lax.rsqrt(jnp.maximum(v + FACTOR_EPS, FACTOR_EPS))
        factored = [v, v, lax.rsqrt(v + RSQRT_EPS), lax.rsqrt(v + RSQRT_EPS), m * v ** -0.5] if vector_factored else []
    return [G, jnp.clip(G, -FEATURE_CLIP, FEATURE_CLIP), p[..., None], m, rms, m * R, R, fac_g, G * R, *factored]


def fold_row_blocks(fn, carry, inputs, axis: int, n_blocks: int):
    """carry <- fn(carry, block, j) for j < n_blocks, block j holding rows j, j + n_blocks, j + 2 n_blocks, ...
    of every input along ``axis`` (n_blocks divides its size). Inputs of size 1 there (broadcast) pass whole.

    Strided blocks take the same rows from every shard of a sharded ``axis``, so they need no communication.
    A single block is the inputs themselves: no loop, so XLA fuses it with the rest of the update.
    """
    if n_blocks == 1:
        return fn(carry, list(inputs), 0)

    def take(x, j):
        if x.shape[axis] == 1:
            return x
        x = x.reshape(x.shape[:axis] + (x.shape[axis] // n_blocks, n_blocks) + x.shape[axis + 1:])
        return lax.dynamic_index_in_dim(x, j, axis + 1, keepdims=False)

    return lax.fori_loop(0, n_blocks, lambda j, c: fn(c, [take(x, j) for x in inputs], j), carry)


def num_row_blocks(shape, axis: int, chunk_elems: int) -> int:
    """The fewest blocks, dividing shape[axis] evenly, with at most ~chunk_elems elements each."""
    n = shape[axis]
    min_blocks = -(-math.prod(shape) // max(chunk_elems, 1))
    return next(k for k in range(1, n + 1) if n % k == 0 and k >= min(min_blocks, n)) if n else 1


def accumulate(g, m, rms, v_row, v_col, v_diag, decays):
    """Update the EMAs of a leaf with its clipped gradient g (docs/learned_optimizers.md#accumulators).

    Returns the new (m, rms, v_row, v_col, v_diag) and ``fac``, the inputs of the factored features:
    (row_factor, col_factor, v_row, v_col) expanded back to g's rank, or (v_diag,) when ndim <= 1.
    """
    momentum_decays, rms_decays, adafactor_decays = decays
    G = g[..., None]
    m = _ema(m, G, momentum_decays)
    rms = _ema(rms, jnp.square(G), rms_decays)
    gsq = jnp.square(G.astype(jnp.float32)) + GSQ_EPS
    dims = factored_dims(g.shape)
    if dims is None:
        v_diag = _ema(v_diag, gsq, adafactor_decays)
        return (m, rms, v_row, v_col, v_diag), (v_diag,)
    d1, d0 = dims
    v_row = _ema(v_row, jnp.mean(gsq, axis=d0), adafactor_decays)
    v_col = _ema(v_col, jnp.mean(gsq, axis=d1), adafactor_decays)
    row_mean = jnp.mean(v_row, axis=d1 - 1 if d1 > d0 else d1, keepdims=True)
    row_factor = lax.rsqrt(jnp.maximum(v_row / (row_mean + FACTOR_EPS), FACTOR_EPS))
    col_factor = lax.rsqrt(jnp.maximum(v_col, FACTOR_EPS))
    fac = (jnp.expand_dims(row_factor, d0), jnp.expand_dims(col_factor, d1),
           jnp.expand_dims(v_row, d0), jnp.expand_dims(v_col, d1))
    return (m, rms, v_row, v_col, v_diag), fac


def init_accumulators(params, n_momentum: int, n_rms: int, n_factored: int) -> dict:
    """Zero accumulators for ``params``: {m, rms} in each param's dtype, {v_row, v_col, v_diag} in float32
    (shapes in ``factored_shapes``)."""
    def zeros(shape_fn, dtype_fn):
        return jax.tree.map(lambda p: jnp.zeros(shape_fn(tuple(p.shape)), dtype_fn(p)), params)

    f32 = lambda p: jnp.float32
    return dict(m=zeros(lambda s: s + (n_momentum,), lambda p: p.dtype),
                rms=zeros(lambda s: s + (n_rms,), lambda p: p.dtype),
                v_row=zeros(lambda s: factored_shapes(s, n_factored)[0], f32),
                v_col=zeros(lambda s: factored_shapes(s, n_factored)[1], f32),
                v_diag=zeros(lambda s: factored_shapes(s, n_factored)[2], f32))


def resolve_theta(theta, load, check) -> dict:
    """A theta dict, or a path to a weight file (read with ``load``); validated by ``check`` and cast to float32
    jax arrays. Which file a configured optimizer uses is its registry record's business (``optim.registry``:
    the shipped weights unless ``optimizer.<name>.theta`` names others)."""
    if theta is None:
        raise ValueError("theta is required: a theta dict or the path of a weight file (the shipped weights: "
                         "optim.registry.get(<optimizer name>).weights.shipped)")
    if isinstance(theta, (str, os.PathLike)):
        theta = load(theta)
    check(theta)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta)
