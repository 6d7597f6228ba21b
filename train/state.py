"""The train state (step, params, optimizer state), its shardings, and its initialisation on the mesh."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from models import GPT, GPTConfig, abstract_params, param_specs
from optim.sharding import named, state_specs


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of float32 arrays
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything static about a run's state: the model graph, abstract shapes and shardings."""
    graphdef: Any
    abstract: TrainState  # jax.ShapeDtypeStruct leaves carrying the shardings of this mesh
    shardings: TrainState  # NamedSharding tree
    param_specs: Any


class ParamsLayout(NamedTuple):
    """The model graph, its parameters' PartitionSpecs and abstract params carrying their shardings."""
    graphdef: Any
    specs: Any
    abstract: Any


def params_layout(model_cfg: GPTConfig, mesh: Mesh) -> ParamsLayout:
    graphdef, abstract_state = abstract_params(model_cfg)
    p_specs = param_specs(abstract_state)
    shardings = named(mesh, p_specs)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            nnx.to_pure_dict(abstract_state), shardings)
    return ParamsLayout(graphdef, p_specs, abstract)


def make_layout(p_layout: ParamsLayout, tx, mesh: Mesh) -> Layout:
    """The train state's layout: the params' (``params_layout``) plus the optimizer state of ``tx``, sharded
    by the layouts its state types declare (``optim.sharding``)."""
    graphdef, p_specs, sharded_params = p_layout
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sharded_params)
    opt_state = jax.eval_shape(tx.init, params)
    o_specs = state_specs(opt_state, params, p_specs, mesh)
    specs = TrainState(P(), p_specs, o_specs)
    shardings = named(mesh, specs)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return Layout(graphdef, abstract, shardings, p_specs)


def init_state(model_cfg: GPTConfig, tx, layout: Layout, seed: int) -> TrainState:
    """Initialise params and optimizer state directly into their shardings (nothing is gathered).

    The values do not depend on the mesh: the same seed gives the same model on any device layout.
    """
    def init(key):
        _, params = nnx.split(GPT(model_cfg, nnx.Rngs(params=key)), nnx.Param)
        return _fresh(tx, nnx.to_pure_dict(params))

    return jax.jit(init, out_shardings=layout.shardings)(jax.random.key(seed))


def state_from_params(tx, layout: Layout, params) -> TrainState:
    """A fresh train state (step 0, new optimizer state) around given params, in the layout's shardings."""
    return jax.jit(lambda p: _fresh(tx, p), out_shardings=layout.shardings)(params)


def _fresh(tx, params) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
