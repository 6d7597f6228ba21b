"""Shard optimizer state like the parameters it belongs to, by layouts that the state types declare.

Every NamedTuple state type that may appear in an optimizer state has a declared layout
(``register_state_layout``): for each of its fields, how the leaves are laid out relative to the parameter
they belong to. A field is either

    REPLICATED     any shape, one copy per device   (step counters, VeLO's per-tensor LSTM state, loss EMAs)
    NESTED         more states                      (optax.masked's inner_state, optax.partition's branches)

or a params-shaped tree (the params' structure; ``MaskedNode`` where another branch owns the leaf) whose
leaf spec is a function ``rule(p.shape, p.spec) -> spec`` of its parameter's, e.g.

    SAME           state shape == p.shape           -> the parameter's spec   (Adam mu/nu, Muon momentum)
    TRAILING       state shape == p.shape + (k,)    -> spec + (None,)         (a trailing decay axis)
    drop_axis(f)   state shape == delete(p.shape, d) + (k,) with d = f(p.shape) -> spec without entry d +
                   (None,) (a factored statistic); f returns None for a placeholder, which is replicated

Tuples, lists and dicts of states (``optax.chain``, partition's branches) are walked. A state type without
a declared layout, a field without a rule, or a rule whose spec does not fit its leaf is an error naming the
leaf: nothing is replicated silently (a 1.3B-parameter run would otherwise hold a full copy of that state
on every device). A derived entry whose mesh axes do not divide the dimension is dropped (replicated on
that dimension).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import optax
import optax.contrib
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REPLICATED = "replicated"
NESTED = "nested"


def SAME(p_shape: tuple, p_spec: tuple) -> tuple:
    return p_spec


def TRAILING(p_shape: tuple, p_spec: tuple) -> tuple:
    return p_spec + (None,)


def drop_axis(reduced_axis: Callable[[tuple], int | None], placeholder_ndim: int = 2) -> Callable:
    """The rule of a statistic that reduced axis ``reduced_axis(p.shape)`` of its parameter and has a trailing
    decay axis; ``None`` marks a placeholder of rank ``placeholder_ndim`` (replicated)."""
    def rule(p_shape: tuple, p_spec: tuple) -> tuple:
        d = reduced_axis(p_shape)
        if d is None:
            return (None,) * placeholder_ndim
        return p_spec[:d] + p_spec[d + 1:] + (None,)
    return rule


_LAYOUTS: dict[type, dict] = {}


def register_state_layout(state_type: type, **fields) -> None:
    """Declare how the leaves of each field of ``state_type`` (a NamedTuple) are sharded (module docstring)."""
    missing = [f for f in state_type._fields if f not in fields]
    extra = [f for f in fields if f not in state_type._fields]
    if missing or extra:
        raise ValueError(f"layout of {state_type.__name__}: fields without a rule {missing}, unknown fields {extra}")
    _LAYOUTS[state_type] = fields


# optax's states used by this project's optimizers
register_state_layout(optax.EmptyState)
register_state_layout(optax.MaskedNode)
register_state_layout(optax.ScaleByScheduleState, count=REPLICATED)
register_state_layout(optax.ScaleByAdamState, count=REPLICATED, mu=SAME, nu=SAME)
register_state_layout(optax.MaskedState, inner_state=NESTED)
register_state_layout(optax.transforms.PartitionState, inner_states=NESTED)
register_state_layout(optax.contrib.MuonState, count=REPLICATED, mu=SAME, ns_coeffs=REPLICATED)


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _fits(spec: tuple, shape: tuple, mesh: Mesh) -> tuple:
    def size(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(mesh.shape[n] for n in names if n is not None)

    return tuple(e if e is None or dim % size(e) == 0 else None for e, dim in zip(spec, shape))


def state_specs(abstract_state, abstract_params, params_specs, mesh: Mesh):
    """A tree of PartitionSpecs with the structure of ``abstract_state`` (see module docstring)."""
    p_leaves, p_def = jax.tree.flatten(abstract_params)
    params = [(tuple(p.shape), _padded(s, p.ndim))
              for p, s in zip(p_leaves, jax.tree.leaves(params_specs, is_leaf=lambda x: isinstance(x, P)))]

    def leaf_spec(rule, param, leaf, where: str) -> P:
        spec = rule(*param)
        if len(spec) != len(leaf.shape):
            raise ValueError(f"optimizer state {where}: its layout rule {getattr(rule, '__name__', rule)} gives "
                             f"{spec} for a leaf of shape {tuple(leaf.shape)} (parameter shape {param[0]})")
        return P(*_fits(spec, tuple(leaf.shape), mesh))

    def params_shaped(value, rule, where: str):
        try:
            per_param = p_def.flatten_up_to(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"optimizer state {where} is declared params-shaped but is not: {e}") from e
        return p_def.unflatten([jax.tree.map(lambda leaf: leaf_spec(rule, param, leaf, where), sub)
                                for param, sub in zip(params, per_param)])

    def walk(node, where: str):
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            layout = _LAYOUTS.get(type(node))
            if layout is None:
                raise ValueError(
                    f"optimizer state {where or 'root'} is a {type(node).__module__}.{type(node).__name__}, "
                    f"whose sharding is not declared: add optim.sharding.register_state_layout({type(node).__name__}, "
                    f"...) next to the transformation that makes it")
            return type(node)(*[field(value, layout[name], f"{where}.{name}")
                                for name, value in zip(node._fields, node)])
        if isinstance(node, (tuple, list)):
            return type(node)(walk(x, f"{where}[{i}]") for i, x in enumerate(node))
        if isinstance(node, dict):
            return {k: walk(v, f"{where}[{k!r}]") for k, v in node.items()}
        raise ValueError(f"optimizer state {where or 'root'}: a {type(node).__name__} outside any declared state "
                         "type, so nothing says how to shard it")

    def field(value, rule, where: str):
        if rule == NESTED:
            return walk(value, where)
        if rule == REPLICATED:
            return jax.tree.map(lambda _: P(), value)
        return params_shaped(value, rule, where)

    return walk(abstract_state, "")


def named(mesh: Mesh, specs):
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
