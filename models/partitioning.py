"""Logical axis names and the one table that maps them onto the device mesh.

Every parameter carries logical axis names (``nnx.Param(..., axes=(...))``); activations are constrained
with the same vocabulary. ``RULES`` maps each logical name to a mesh axis (or a tuple of them, or None for
replicated). The mesh has the axes ``('data', 'fsdp', 'tensor')``:

* batch          -> ('data', 'fsdp')   data parallelism, also across the FSDP group
* embed          -> 'fsdp'             ZeRO-3: every weight is split over the fsdp axis along d_model
* heads, kv_heads, mlp -> 'tensor'     Megatron: attention heads (query and key/value) and the MLP hidden dim
* vocab          -> 'tensor'           the (tied) embedding/unembedding is split over the vocabulary
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "qkv": None,
    "position": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(axes: tuple[str | None, ...]) -> P:
    """PartitionSpec for a tuple of logical axis names (None entries stay replicated)."""
    unknown = [a for a in axes if a is not None and a not in RULES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; add them to models.partitioning.RULES")
    return P(*(RULES[a] if a is not None else None for a in axes))


def param_specs(params_with_axes) -> dict:
    """Map an ``nnx.State`` of ``nnx.Param`` (carrying ``axes`` metadata) to a pure dict of PartitionSpecs."""
    from flax import nnx

    def spec(variable):
        axes = variable.get_metadata().get("axes")
        if axes is None:
            raise ValueError(f"parameter of shape {variable.shape} has no logical axis names")
        return logical_to_spec(axes)

    leaves, treedef = jax.tree.flatten(params_with_axes, is_leaf=lambda x: isinstance(x, nnx.Variable))
    pure_treedef = jax.tree.structure(nnx.to_pure_dict(params_with_axes))
    return jax.tree.unflatten(pure_treedef, [spec(v) for v in leaves])


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is active (single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))
