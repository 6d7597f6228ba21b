"""Shard optimizer state like the parameters it belongs to.

Each state leaf is matched to the parameter whose key path appears inside the leaf's key path (optax
states hold params-shaped trees: ``ScaleByAdamState.mu['blocks'][0]['mlp']['fc_kernel']``), and its
PartitionSpec is derived from the parameter's by shape:

    state shape == p.shape                  -> the parameter's spec           (Adam mu/nu, Muon momentum)
    state shape == p.shape + (k,)           -> spec + (None,)                 (a trailing decay axis)
    state shape == delete(p.shape, d) + (k,) -> spec without entry d + (None,) (a factored row/col statistic)
    anything else (counters, scalars, per-tensor LSTM state, placeholders) -> replicated

A derived entry whose mesh axes do not divide the dimension is dropped (replicated on that dimension).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _key_name(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _path(keypath) -> tuple:
    return tuple(_key_name(k) for k in keypath)


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _derive(state_shape: tuple, p_shape: tuple, p_spec: tuple) -> tuple | None:
    if state_shape == p_shape:
        return p_spec
    if state_shape[:-1] == p_shape:
        return p_spec + (None,)
    if len(state_shape) == len(p_shape) and state_shape:
        for d in reversed(range(len(p_shape))):
            if state_shape[:-1] == p_shape[:d] + p_shape[d + 1:]:
                return p_spec[:d] + p_spec[d + 1:] + (None,)
    return None


def _fits(spec: tuple, shape: tuple, mesh: Mesh) -> tuple:
    def size(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(mesh.shape[n] for n in names if n is not None)

    return tuple(e if e is None or dim % size(e) == 0 else None for e, dim in zip(spec, shape))


def state_specs(abstract_state, abstract_params, params_specs, mesh: Mesh):
    """A tree of PartitionSpecs with the structure of ``abstract_state`` (see module docstring)."""
    by_path = {}
    for (kp, p), spec in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                             jax.tree.leaves(params_specs, is_leaf=lambda x: isinstance(x, P))):
        by_path[_path(kp)] = (tuple(p.shape), _padded(spec, p.ndim))
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def leaf_spec(keypath, leaf):
        path, shape = _path(keypath), tuple(getattr(leaf, "shape", ()))
        for n in lengths:
            for start in range(len(path) - n + 1):
                match = by_path.get(path[start:start + n])
                if match is not None:
                    derived = _derive(shape, *match)
                    if derived is not None:
                        return P(*_fits(derived, shape, mesh))
        return P()

    return jax.tree_util.tree_map_with_path(leaf_spec, abstract_state)


def named(mesh: Mesh, specs):
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
