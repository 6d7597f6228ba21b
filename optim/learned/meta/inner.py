"""Inner problems for truncated meta-training (docs/meta_training.md#task-augmentation,
#inner-optimizer, #unrolls-and-truncation): resets, lengths, reparametrisation, optimizer.

``TruncatedProblem`` turns a pure task (``init``, ``loss``, ``sample_batch``) and a function
``make_opt(theta) -> optax.GradientTransformation`` into one vmappable inner step with automatic resets:

- An inner problem lasts ``length = int(exp(U(ln min_unroll, ln max_unroll)))`` steps. When
  ``inner_step >= length`` the step resets instead of training: new length, new init, new reparam scale,
  new optimizer state; it reports meta-loss 0, ``is_done`` True and ``mask`` False. An optimizer whose state
  has a ``num_steps`` field (VeLO) gets the problem's length there: it plans for the steps it will train.
- Reparametrisation (``--aug reparam --aug_reparam_level global``): one scale s = exp(U(ln 1e-3, ln 1e3))
  per problem; the stored params are w0 / s and the loss is evaluated at w * s, so the function is the same
  and gradients are multiplied by s.
- The meta-loss of a step is the training loss of the current minibatch before the update, normalised as
  clip(loss, 0, 1.5 ln 10) with NaN/inf -> 1.5 ln 10. The raw loss also goes to the optimizer's update as
  the ``loss`` extra arg (VeLO's loss features; the Celo2 rules ignore it).

Which optimizers can be meta-trained, and how their weights are made, read and written, is in their
``optim.registry`` records (``MetaTraining``, ``WeightFormat``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import registry

LOSS_MAX = 1.5 * math.log(10.0)


def normalize_loss(loss):
    """clip(loss, 0, 1.5 ln 10) with NaN and inf mapped to the maximum (docs/meta_training.md#tasks)."""
    return jnp.where(jnp.isfinite(loss), jnp.clip(loss, 0.0, LOSS_MAX), LOSS_MAX)


class MetaAdamState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


def scale_by_meta_adam(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> optax.GradientTransformation:
    """The meta-training Adam (docs/meta_training.md#inner-optimizer):
    m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, step = m / sqrt(v + eps).

    No bias correction and eps inside the square root (unlike ``optax.adam``). Returns the step before the lr.
    """
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return MetaAdamState(zeros, zeros)

    def update(g, state, params=None):
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, g)
        return jax.tree.map(lambda m, v: m / jnp.sqrt(v + eps), m, v), MetaAdamState(m, v)

    return optax.GradientTransformation(init, update)


def path_str(path) -> str:
    """Haiku-style flat name of a key path: ('mlp/~/linear_0', 'b') -> 'mlp/~/linear_0/b'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def regex_labels(regex_1d: str) -> Callable:
    """'adam' for leaves whose flat path matches ``regex_1d`` (re.search), else 'learned'
    (docs/meta_training.md#inner-optimizer)."""
    pattern = re.compile(regex_1d)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "adam" if pattern.search(path_str(path)) else "learned", params)
    return labels


def meta_training_optimizer(variant: str = "celo2", step_mult: float = 1e-3, mult_1d: float = 20.0,
                            regex_1d: str = r"/b$") -> Callable[[Any], optax.GradientTransformation]:
    """``theta -> inner optimizer`` as used during meta-training
    (docs/meta_training.md#inner-optimizer); weight decay 0.

    The variant's learned rule (its registry record's ``meta.rule``) times ``step_mult`` on every leaf; for
    variants with ``adam_1d`` (celo2) the leaves matching ``regex_1d`` (biases) go to the meta-training Adam
    at lr ``step_mult * mult_1d`` instead. VeLO's num_steps is set per problem by ``TruncatedProblem.init``.
    """
    meta = registry.meta_trainable(variant).meta

    def make(theta):
        rule = optax.chain(meta.rule(theta), optax.scale(step_mult))
        if not meta.adam_1d:
            return rule
        return optax.partition({
            "learned": rule,
            "adam": optax.chain(scale_by_meta_adam(), optax.scale(-step_mult * mult_1d)),
        }, regex_labels(regex_1d))
    return make


class InnerState(NamedTuple):
    params: Any  # stored params (w / scale)
    opt_state: Any
    inner_step: jax.Array  # int32: steps trained in the current problem
    length: jax.Array  # int32: steps this problem lasts
    scale: jax.Array  # float32: reparametrisation scale s


class StepOut(NamedTuple):
    meta_loss: jax.Array  # normalised loss, 0 on reset steps
    is_done: jax.Array  # True on a reset step
    mask: jax.Array  # False on a reset step
    loss: jax.Array  # raw training loss (NaN-able), 0 on reset steps


def reparam(params, scale):
    """The function-space params of stored params: w * s."""
    return jax.tree.map(lambda w: w * scale, params)


@dataclass(frozen=True)
class TruncatedProblem:
    task: Any  # init(key), loss(params, batch), sample_batch(data, key)
    make_opt: Callable[[Any], optax.GradientTransformation]
    min_unroll: int = 100
    max_unroll: int = 2000
    reparam_range: tuple = (1e-3, 1e3)

    def init(self, theta, key, desync: bool = False) -> InnerState:
        """A fresh inner problem; with ``desync`` its inner_step starts uniformly in [0, max_unroll)."""
        k_len, k_scale, k_init, k_step = jax.random.split(key, 4)
        log_len = jax.random.uniform(k_len, (), minval=math.log(self.min_unroll), maxval=math.log(self.max_unroll))
        length = jnp.exp(log_len).astype(jnp.int32)
        lo, hi = (math.log(r) for r in self.reparam_range)
        scale = jnp.exp(jax.random.uniform(k_scale, (), minval=lo, maxval=hi))
        params = jax.tree.map(lambda w: w / scale, self.task.init(k_init))
        opt_state = self.make_opt(theta).init(params)
        if optax.tree_utils.tree_get(opt_state, "num_steps") is not None:  # VeLO: plan for this problem's length
            opt_state = optax.tree_utils.tree_set(opt_state, num_steps=length)
        step = (jax.random.randint(k_step, (), 0, self.max_unroll) if desync else jnp.zeros((), jnp.int32))
        return InnerState(params, opt_state, step.astype(jnp.int32), length, scale)

    def step(self, theta, data, state: InnerState, key) -> tuple[InnerState, StepOut]:
        """One inner step: a reset if the problem is over, else one optimizer step on a fresh minibatch."""
        k_reset, k_batch = jax.random.split(key)
        done = state.inner_step >= state.length
        fresh = self.init(theta, k_reset)
        batch = self.task.sample_batch(data, k_batch)
        loss, grads = jax.value_and_grad(lambda p: self.task.loss(reparam(p, state.scale), batch))(state.params)
        opt = optax.with_extra_args_support(self.make_opt(theta))
        updates, opt_state = opt.update(grads, state.opt_state, state.params, loss=loss)
        trained = InnerState(optax.apply_updates(state.params, updates), opt_state, state.inner_step + 1,
                             state.length, state.scale)
        new = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, trained)
        zero = jnp.zeros_like(loss)
        return new, StepOut(jnp.where(done, zero, normalize_loss(loss)), done, ~done, jnp.where(done, zero, loss))
