"""The jitted train and eval steps.

Loss: mean next-token cross-entropy over the tokens whose ``loss_mask`` is 1,

    loss = sum_{b,l} CE(logits[b,l], targets[b,l]) * mask[b,l] / sum_{b,l} mask[b,l],

the sum made ``loss_chunk`` positions at a time when that is set (``train.loss``).

With gradient accumulation the batch is split into ``microbatches`` interleaved slices (rows j*M + i),
which keeps each slice sharded like the batch; the per-slice gradients of the masked *sum* are added up
and divided once by the batch's token count, so the result equals the full-batch gradient.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from train.diagnostics import parameter_diagnostics
from train.loss import cross_entropy_rows, cross_entropy_sum
from train.state import Layout, ParamsLayout, TrainState


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def _loss_sum(graphdef, params, batch, dropout_key, loss_chunk: int):
    return cross_entropy_sum(nnx.merge(graphdef, params), batch, dropout_key, loss_chunk)


def make_train_step(layout: Layout, tx, schedule, mesh, *, microbatches: int, seed: int, dropout: bool,
                    loss_chunk: int = 0, skip_spikes: bool = False, diagnostics: bool = False):
    """The jitted ``train_step(state, batch) -> (state, metrics)``. With ``skip_spikes`` it takes one more
    argument, ``max_loss``: a step whose loss exceeds it keeps its params and optimizer state (its step count
    still advances, as the data does) and reports ``skipped`` (0 or 1). With ``diagnostics`` it takes the
    previous diagnostic step's updates after the batch (donated), adds ``train.diagnostics`` to the metrics
    and returns this step's updates too: ``(state, metrics, updates)``."""
    graphdef = layout.graphdef
    grad_fn = jax.value_and_grad(lambda p, b, k: _loss_sum(graphdef, p, b, k, loss_chunk))

    def gradients(state: TrainState, batch):
        """(mean loss, its gradient) over the batch, in ``microbatches`` slices."""
        n_tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None
        if microbatches == 1:
            loss_sum, grads = grad_fn(state.params, batch, key)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def accumulate(carry, xs):
                i, mb = xs
                mb_key = None if key is None else jax.random.fold_in(key, i)
                l, g = grad_fn(state.params, mb, mb_key)
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
        return loss_sum / n_tokens, jax.tree.map(lambda g: g / n_tokens, grads)

    def train_step(state: TrainState, batch, *extra):
        loss, grads = gradients(state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        if skip_spikes:
            skip = loss > extra[-1]
            kept = jax.tree.map(lambda n, o: jnp.where(skip, o, n), (new.params, new.opt_state),
                                (state.params, state.opt_state))
            new, metrics = TrainState(new.step, *kept), {**metrics, "skipped": skip.astype(jnp.float32)}
        if not diagnostics:
            return new, metrics
        return new, {**metrics, **parameter_diagnostics(state.params, grads, updates, extra[0])}, updates

    replicated = NamedSharding(mesh, P())
    params = layout.shardings.params
    in_shardings = ((layout.shardings, batch_sharding(mesh)) + ((params,) if diagnostics else ())
                    + ((replicated,) if skip_spikes else ()))
    out_shardings = (layout.shardings, replicated) + ((params,) if diagnostics else ())
    return jax.jit(train_step, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=(0, 2) if diagnostics else (0,))


def make_zero_updates(layout: Layout):
    """The jitted ``zeros(params)``: updates of all zeros laid out like the parameters (the "previous
    updates" of the first diagnostic step)."""
    return jax.jit(lambda params: jax.tree.map(jnp.zeros_like, params), in_shardings=(layout.shardings.params,),
                   out_shardings=layout.shardings.params)


def _param_shardings(p_layout: ParamsLayout):
    return jax.tree.map(lambda a: a.sharding, p_layout.abstract)


def make_eval_step(p_layout: ParamsLayout, mesh, loss_chunk: int = 0):
    """(sum of masked CE, number of masked tokens) for one held-out batch (parameters only: no optimizer)."""
    def eval_step(params, batch):
        return _loss_sum(p_layout.graphdef, params, batch, None, loss_chunk), batch["loss_mask"].sum()

    replicated = NamedSharding(mesh, P())
    return jax.jit(eval_step, in_shardings=(_param_shardings(p_layout), batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))


def make_score_step(p_layout: ParamsLayout, mesh, loss_chunk: int = 0):
    """The jitted ``score_step(params, batch) -> [B]``: each row's log-likelihood of its masked targets,
    ``sum_l mask[b,l] * log p(targets[b,l] | inputs[b,:l+1])`` (``train.loss.cross_entropy_rows``, negated),
    rows sharded over the batch axes like a training batch, the result replicated. Any [B, L] shape (B a
    multiple of the batch axes' size): each new shape compiles once. ``loss_chunk`` is used where it divides
    L, else the greatest common divisor of the two (positions per piece of float32 logits)."""
    def score_step(params, batch):
        L = batch["inputs"].shape[1]
        chunk = math.gcd(loss_chunk, L) if loss_chunk else 0
        return -cross_entropy_rows(nnx.merge(p_layout.graphdef, params), batch, chunk)

    return jax.jit(score_step, in_shardings=(_param_shardings(p_layout), batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))
