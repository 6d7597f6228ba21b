"""Persistent Evolution Strategies over truncated unrolls (docs/meta_training.md#unrolls-and-truncation,
#the-pes-estimator), generic over theta.

Nothing here knows about Celo2: theta is any pytree of float arrays, and each task family is a
``problem`` with ``init(theta, key, desync) -> state`` and ``step(theta, data, state, key) -> (state, out)``
where ``out`` has ``meta_loss``, ``is_done`` and ``mask`` (see ``inner.TruncatedProblem``, which builds
them from ``theta -> optax transformation``). A VeLO implementation reuses this unchanged.

Per outer iteration, for every family f and particle i < P:

    eps_i ~ N(0, std^2 I);  unroll theta + eps_i and theta - eps_i for T steps on the same batches and keys
    dL_t = L+_t - L-_t;  fin_t = cumsum(is_done)_t > 0;  D = sum_t mask_t
    old = sum_t dL_t (1 - fin_t) mask_t / D;   new = sum_t dL_t fin_t mask_t / D
    A_i <- A_i + eps_i;  g_i = (old A_i + new eps_i) / (2 std^2);  A_i <- eps_i if fin_T else A_i
    g_f = mean_i g_i

and the outer step applies ``outer_opt`` to g = mean_f g_f with NaNs set to 0. The loss reported for
family f is mean_i (mean_t L+ + mean_t L-) / 2, replaced by 20 if NaN.

Vectorisation: each family runs one ``lax.scan`` over T steps whose body is ``vmap`` over the sign (theta
+- eps, shared keys) of ``vmap`` over particles; the whole outer iteration is one jitted function.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

NAN_LOSS = 20.0


class PESState(NamedTuple):
    theta: Any
    opt_state: Any
    inner: tuple  # per family: problem state with leading axes [2 (sign), P]
    accum: tuple  # per family: theta-shaped pytree with leading axis [P] (A_i)
    key: jax.Array  # uint32 [2] raw PRNG key
    iteration: jax.Array  # int32: outer updates done


def tree_stack_sign(plus, minus):
    return jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus)


def init(key, theta, outer_opt: optax.GradientTransformation, problems: Sequence, num_particles: int) -> PESState:
    """Outer optimizer state, zero accumulators and desynchronised inner problems (+ and - start equal)."""
    inner, accum = [], []
    for f, problem in enumerate(problems):
        keys = jax.random.split(jax.random.fold_in(key, f), num_particles)
        state = jax.vmap(lambda k: problem.init(theta, k, True))(keys)
        inner.append(tree_stack_sign(state, state))
        accum.append(jax.tree.map(lambda t: jnp.zeros((num_particles,) + t.shape, t.dtype), theta))
    return PESState(theta, outer_opt.init(theta), tuple(inner), tuple(accum),
                    jax.random.fold_in(key, len(problems)), jnp.zeros((), jnp.int32))


def pes_gradient(eps, accum, meta_loss_pos, meta_loss_neg, is_done, mask, std):
    """The PES estimate of one family from its unroll (docs/meta_training.md#the-pes-estimator).

    eps, accum: theta-shaped pytrees with a leading particle axis [P]; losses, is_done, mask: [T, P].
    Returns (mean_i g_i, new accumulators, per-particle (old, new) coefficients).
    """
    fin = jnp.cumsum(is_done.astype(jnp.int32), axis=0) > 0
    m = mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(m, axis=0), 1.0)
    delta = meta_loss_pos - meta_loss_neg
    old = jnp.sum(delta * (1.0 - fin) * m, axis=0) / denom
    new = jnp.sum(delta * fin * m, axis=0) / denom
    accum = jax.tree.map(lambda a, e: a + e, accum, eps)

    def per_leaf(a, e):
        bc = (-1,) + (1,) * (a.ndim - 1)
        g = (old.reshape(bc) * a + new.reshape(bc) * e) / (2.0 * std**2)
        return jnp.mean(g, axis=0)

    grad = jax.tree.map(per_leaf, accum, eps)
    reset = fin[-1]
    accum = jax.tree.map(lambda a, e: jnp.where(reset.reshape((-1,) + (1,) * (a.ndim - 1)), e, a), accum, eps)
    return grad, accum, (old, new)


def unroll(problem, theta_pm, data, inner, key, trunc_length: int):
    """Advance the [2, P] inner problems by ``trunc_length`` steps; + and - share every key."""
    num_particles = jax.tree.leaves(inner)[0].shape[1]
    step = jax.vmap(jax.vmap(problem.step, in_axes=(0, None, 0, 0)), in_axes=(0, None, 0, None))

    def body(state, k):
        state, out = step(theta_pm, data, state, jax.random.split(k, num_particles))
        return state, out

    return lax.scan(body, inner, jax.random.split(key, trunc_length))


def estimate(state: PESState, datas: Sequence, *, problems: Sequence, trunc_length: int = 50,
             std: float = 0.01) -> tuple[Any, PESState, dict]:
    """The PES gradient of one outer iteration: a PES estimate per family and their mean (NaN -> 0).

    Returns (grad, state with the inner problems / accumulators / key advanced but theta unchanged, metrics).
    """
    theta = state.theta
    key, *fkeys = jax.random.split(state.key, 1 + len(problems))
    grads, inner, accum, metrics = [], [], [], {}
    for f, (problem, data, fkey) in enumerate(zip(problems, datas, fkeys)):
        num_particles = jax.tree.leaves(state.accum[f])[0].shape[0]
        k_eps, k_unroll = jax.random.split(fkey)
        leaves, treedef = jax.tree.flatten(theta)
        eps = treedef.unflatten([
            std * jax.random.normal(k, (num_particles,) + t.shape, t.dtype)
            for k, t in zip(jax.random.split(k_eps, len(leaves)), leaves)])
        theta_pm = jax.tree.map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)
        new_inner, out = unroll(problem, theta_pm, data, state.inner[f], k_unroll, trunc_length)
        g, acc, (old, new) = pes_gradient(eps, state.accum[f], out.meta_loss[:, 0], out.meta_loss[:, 1],
                                          out.is_done[:, 0], out.mask[:, 0], std)
        grads.append(g)
        inner.append(new_inner)
        accum.append(acc)
        loss = jnp.mean(jnp.mean(out.meta_loss, axis=0))  # mean_i (mean_t L+ + mean_t L-) / 2
        metrics[f"family_{f}/mean_loss"] = jnp.where(jnp.isnan(loss), NAN_LOSS, loss)
        metrics[f"family_{f}/grad_norm"] = optax.tree.norm(g)
        metrics[f"family_{f}/delta_loss_mean"] = jnp.mean(jnp.abs(old + new))
        metrics[f"family_{f}/resets"] = jnp.sum(out.is_done[:, 0])
        if hasattr(new_inner, "inner_step"):
            metrics[f"family_{f}/inner_step"] = jnp.mean(new_inner.inner_step.astype(jnp.float32))
    grad = jax.tree.map(lambda *g: jnp.where(jnp.isnan(sum(g)), 0.0, sum(g) / len(g)), *grads)
    fam = [metrics[f"family_{f}/mean_loss"] for f in range(len(problems))]
    metrics["mean_loss"] = sum(fam) / len(fam)
    metrics["theta_grad_norm"] = optax.tree.norm(grad)
    metrics["theta_grad_abs_mean"] = (sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grad))
                                      / sum(g.size for g in jax.tree.leaves(grad)))
    return grad, state._replace(inner=tuple(inner), accum=tuple(accum), key=key), metrics


def step(state: PESState, datas: Sequence, *, problems: Sequence, outer_opt: optax.GradientTransformation,
         trunc_length: int = 50, std: float = 0.01) -> tuple[PESState, dict]:
    """One outer iteration: ``estimate``, then one update of theta by ``outer_opt``."""
    grad, state, metrics = estimate(state, datas, problems=problems, trunc_length=trunc_length, std=std)
    updates, opt_state = outer_opt.update(grad, state.opt_state, state.theta)
    theta = optax.apply_updates(state.theta, updates)
    return state._replace(theta=theta, opt_state=opt_state, iteration=state.iteration + 1), metrics


def meta_objective(theta, problems: Sequence, datas: Sequence, key, num_problems: int, max_steps: int):
    """The meta-objective (docs/meta_training.md#meta-objective) measured directly instead of through
    truncations: per family, the mean over ``num_problems`` whole inner problems (drawn from ``key``: length,
    reparam scale, init; then the batches) of each problem's average normalised training loss over its
    trajectory. The same ``key`` gives every theta the same problems and batches (common random numbers), so
    two thetas' values differ by the rule, not by the draw. ``max_steps`` must cover the longest problem
    (``max_unroll``). Returns [families].
    """
    out = []
    for f, (problem, data) in enumerate(zip(problems, datas)):
        state = jax.vmap(lambda k: problem.init(theta, k))(jax.random.split(jax.random.fold_in(key, f), num_problems))

        def body(carry, k):
            state, finished = carry
            keys = jax.random.split(k, num_problems)
            state, o = jax.vmap(lambda s, kk: problem.step(theta, data, s, kk))(state, keys)
            finished = finished | o.is_done
            live = o.mask & ~finished
            return (state, finished), (jnp.where(live, o.meta_loss, 0.0), live)

        steps = jax.random.split(jax.random.fold_in(key, len(problems) + f), max_steps)
        _, (loss, live) = lax.scan(body, (state, jnp.zeros((num_problems,), bool)), steps)
        out.append(jnp.mean(loss.sum(0) / jnp.maximum(live.sum(0), 1)))
    return jnp.stack(out)
