"""The training loss: masked next-token cross-entropy, summed, optionally a chunk of positions at a time.

    loss_sum = sum_{b,l} mask[b,l] * (logsumexp_v logits[b,l,v] - logits[b,l,targets[b,l]])

With ``chunk`` > 0 the sequence is cut into L / chunk pieces and a ``lax.scan`` makes each piece's float32
logits [B, chunk, V] from the final hidden states, reduces them to the piece's loss sum and drops them; the
piece is rematerialised (``jax.checkpoint``) so that the backward pass recomputes its logits too. So the
[B, L, V] float32 logits (at GPT-2's vocabulary, 50304 x 4 bytes per token: 200 KB, more than the rest of a
GPT-2 small token's activations) never exist at once, for one extra head matmul per step. The value and
the gradient equal the unchunked loss up to float32 summation order.

``cross_entropy_rows`` is the same sum kept per row, ``rows[b] = sum_l mask[b,l] * CE[b,l]``: minus the
log-likelihood of each row's masked targets (the multiple-choice scorer of ``train.tasks``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _piece_sum(model, x_BxCxD, targets_BxC, mask_BxC, per_row: bool):
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(x_BxCxD), targets_BxC)
    return jnp.sum(ce * mask_BxC, axis=-1 if per_row else None)


def cross_entropy_sum(model, batch: dict, dropout_key, chunk: int = 0):
    """Masked cross-entropy summed over the batch (see the module docstring); ``chunk``: positions per piece,
    dividing the sequence length, or 0 for the whole sequence at once."""
    return _masked_sum(model, batch, dropout_key, chunk, per_row=False)


def cross_entropy_rows(model, batch: dict, chunk: int = 0):
    """Masked cross-entropy summed per row, [B] (see the module docstring); no dropout."""
    return _masked_sum(model, batch, None, chunk, per_row=True)


def _masked_sum(model, batch: dict, dropout_key, chunk: int, per_row: bool):
    x_BxLxD = model.hidden(batch["inputs"], batch["segment_ids"], dropout_key)
    B, L, D = x_BxLxD.shape
    if not chunk or chunk >= L:
        return _piece_sum(model, x_BxLxD, batch["targets"], batch["loss_mask"], per_row)
    if L % chunk:
        raise ValueError(f"loss_chunk={chunk} does not divide the sequence length {L}")

    def pieces(a):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
        return a.reshape(B, L // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)

    piece = jax.checkpoint(lambda x, t, m: _piece_sum(model, x, t, m, per_row))
    zero = jnp.zeros((B,) if per_row else (), jnp.float32)
    total, _ = jax.lax.scan(lambda acc, xs: (acc + piece(*xs), None), zero,
                            (pieces(x_BxLxD), pieces(batch["targets"]), pieces(batch["loss_mask"])))
    return total
