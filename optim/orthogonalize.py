"""Newton-Schulz orthogonalisation of every matrix of an update, replicated or distributed over the mesh.

Muon and Celo2 orthogonalise each weight matrix of their update (the last two axes of a leaf; leading axes
are a batch: per q/k/v and head for attention). A matrix is split over the mesh like its parameter (FSDP
shards of d_model, heads over the tensor axis), and a Newton-Schulz iteration multiplies whole matrices. Two
placements do that:

``replicated``   each leaf is orthogonalised where it lies: XLA's partitioner gathers every matrix onto every
                 device that holds a shard of it for the iterations' products, so each device holds every
                 matrix of the model at once (the compiled FLOPs show it still splits the products' work).
``distributed``  the matrices are dealt out over all devices of the mesh. Leaves are flattened to batches
                 of wide matrices (a tall one transposed: NS(X^T) = NS(X)^T), matrices of one shape are
                 stacked into one batch, zero-padded to a multiple of the device count (NS(0) = 0) and
                 resharded with the batch axis split over every mesh axis, an all-to-all: each device then
                 holds ceil(B / devices) whole matrices of each shape, runs the iterations on them alone, and
                 the results are resharded back to their parameters' layout. Per device this gathers 1/devices
                 of the matrices (plus at most one padding matrix per shape) and does 1/devices of the work.

Both give the same update up to float32 summation order (a matrix product split over shards adds its partial
sums in another order). ``auto`` takes ``distributed`` on a mesh of more than one device whose matrices hold
at least ``AUTO_MIN_ELEMENTS`` elements in all, else ``replicated``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

MODES = ("auto", "replicated", "distributed")
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (a, b, c): optax's and Celo2's defaults
AUTO_MIN_ELEMENTS = 1 << 20  # a model whose matrices hold fewer elements keeps the replicated placement


def newton_schulz(x: jax.Array, coeffs: tuple, iters: int, eps: float, normalize: bool = True) -> jax.Array:
    """Newton-Schulz iteration towards U V^T of each matrix over the last two axes (leading axes batched).

    Tall slices are transposed to wide; with ``normalize``, X <- X / (||X||_F + eps) first (without it, X
    must be normalised already); then ``iters`` times A = X X^T, B = b A + c A A, X <- a X + B X, with the
    products in the order of optax's and the official Celo2 code ((c A) A), so the results agree bit for bit.
    """
    a, b, c = coeffs
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    if normalize:
        x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(iters):
        A = x @ jnp.swapaxes(x, -1, -2)
        B = b * A + c * A @ A
        x = a * x + B @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the matrices of an update are orthogonalised (module docstring).

    ``distributed`` False: each leaf where it lies. True: dealt out over ``mesh``; ``specs`` maps each
    parameter's key path (``jax.tree_util.keystr``) to its PartitionSpec, the layout results go back to.
    """
    distributed: bool = False
    mesh: object = None
    specs: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return "distributed" if self.distributed else "replicated"


REPLICATED = Placement()


def matrix_elements(abstract_params) -> int:
    """Elements of the leaves with two or more axes (the matrices an orthogonalising optimizer may see)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_params) if len(p.shape) >= 2)


def make_placement(mode: str, mesh, abstract_params, specs) -> Placement:
    """The ``Placement`` of ``optimizer.orthogonalize`` = ``mode`` for params ``abstract_params`` laid out by
    ``specs`` (a tree of PartitionSpecs) on ``mesh``; ``auto`` as the module docstring says."""
    if mode not in MODES:
        raise ValueError(f"optimizer.orthogonalize={mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        big = matrix_elements(abstract_params) >= AUTO_MIN_ELEMENTS
        mode = "distributed" if mesh.size > 1 and big else "replicated"
    if mode == "replicated":
        return REPLICATED
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    leaf_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return Placement(True, mesh, {jax.tree_util.keystr(path): spec for (path, _), spec in zip(flat, leaf_specs)})


def _as_wide_batch(x: jax.Array) -> tuple[jax.Array, Callable]:
    """x [..., r, c] as a batch of wide matrices [B, min(r, c), max(r, c)], and the inverse."""
    *_, r, c = x.shape
    batch = x.reshape(-1, r, c)
    tall = r > c
    if tall:
        batch = jnp.swapaxes(batch, -1, -2)

    def back(y):
        return (jnp.swapaxes(y, -1, -2) if tall else y).reshape(x.shape)
    return batch, back


def orthogonalize_matrices(tree, fn: Callable, placement: Placement = REPLICATED):
    """``tree`` with ``fn`` applied to every matrix of its leaves with two or more axes (others unchanged).

    ``fn`` maps an array of matrices [..., m, n] (the last two axes; any leading axes, wide or tall) to the same
    shape, matrix by matrix (Newton-Schulz: ``newton_schulz``); ``placement`` says where it runs (module
    docstring).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = [x for _, x in flat]
    matrices = [i for i, (_, x) in enumerate(flat) if x.ndim >= 2]
    if not placement.distributed:
        for i in matrices:
            out[i] = fn(out[i])
        return jax.tree.unflatten(treedef, out)

    mesh = placement.mesh
    dealt = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # batch axis over every device
    groups: dict[tuple, list] = {}
    for i in matrices:
        batch, back = _as_wide_batch(out[i])
        groups.setdefault((batch.shape[1:], batch.dtype), []).append((i, batch, back))
    for members in groups.values():
        stacked = jnp.concatenate([batch for _, batch, _ in members])
        n = stacked.shape[0]
        stacked = jnp.pad(stacked, ((0, -n % mesh.size), (0, 0), (0, 0)))
        result = jax.lax.with_sharding_constraint(fn(jax.lax.with_sharding_constraint(stacked, dealt)), dealt)
        start = 0
        for i, batch, back in members:
            key = jax.tree_util.keystr(flat[i][0])
            out[i] = jax.lax.with_sharding_constraint(back(result[start:start + batch.shape[0]]),
                                                      NamedSharding(mesh, placement.specs[key]))
            start += batch.shape[0]
    return jax.tree.unflatten(treedef, out)
