"""The chunked cross-entropy (train/loss.py): the same value and gradient as the whole-sequence loss, less memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import GPT, model_config
from train.loss import cross_entropy_rows, cross_entropy_sum


def _batch(rng, B, L, V):
    tokens = rng.integers(0, V, (B, L + 1))
    seg = np.where(np.arange(L) < L // 3, 1, 2)[None].repeat(B, 0)
    mask = (rng.random((B, L)) > 0.2).astype(np.float32)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(seg, jnp.int32), "loss_mask": jnp.asarray(mask)}


def _loss_and_grad(vocab, batch, chunk):
    graphdef, params = nnx.split(GPT(model_config("cpu-tiny", vocab_size=vocab), nnx.Rngs(0)), nnx.Param)
    fn = jax.jit(jax.value_and_grad(lambda p: cross_entropy_sum(nnx.merge(graphdef, p), batch, None, chunk)))
    return fn, params


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_loss_has_the_same_value_and_gradient(chunk):
    batch = _batch(np.random.default_rng(0), B=3, L=64, V=384)
    whole_fn, params = _loss_and_grad(384, batch, 0)
    chunked_fn, _ = _loss_and_grad(384, batch, chunk)
    (whole, g_whole), (chunked, g_chunked) = whole_fn(params), chunked_fn(params)
    np.testing.assert_allclose(chunked, whole, rtol=2e-6)
    assert float(whole) > 0
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):  # float32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_per_row_sums_add_up_to_the_loss_in_any_chunking():
    """``cross_entropy_rows`` (the multiple-choice scorer's): row b's masked sum, whole or in pieces."""
    batch = _batch(np.random.default_rng(1), B=3, L=64, V=384)
    graphdef, params = nnx.split(GPT(model_config("cpu-tiny", vocab_size=384), nnx.Rngs(0)), nnx.Param)
    model = nnx.merge(graphdef, params)
    rows = {chunk: np.asarray(cross_entropy_rows(model, batch, chunk)) for chunk in (0, 8, 64)}
    assert rows[0].shape == (3,)
    for chunk in (8, 64):
        np.testing.assert_allclose(rows[chunk], rows[0], rtol=2e-6)
    np.testing.assert_allclose(rows[0].sum(), float(cross_entropy_sum(model, batch, None)), rtol=2e-6)
    one = {k: v[1:2] for k, v in batch.items()}  # a row alone has the same sum
    np.testing.assert_allclose(float(cross_entropy_sum(model, one, None)), rows[0][1], rtol=2e-6)


def test_chunked_loss_never_holds_the_whole_logits():
    """XLA's buffer assignment for the loss's gradient: the [B, L, V] float32 logits (and their gradient)
    set the temporary memory of the whole-sequence loss; in pieces of 32 positions they are 1/16 of it."""
    B, L, V = 8, 256, 8192
    batch = _batch(np.random.default_rng(0), B, L, V)
    temp = {}
    for chunk in (0, 32):
        fn, params = _loss_and_grad(V, batch, chunk)
        temp[chunk] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = B * L * V * 4
    assert temp[0] >= logits_bytes  # the whole logits are live at once
    assert temp[32] < temp[0] - logits_bytes  # they never are in pieces


def test_loss_chunk_must_divide_the_sequence(tmp_path):
    from configs.cpu_tiny import get_config
    from train.config import load_config

    cfg = get_config()
    cfg.workdir = str(tmp_path)
    cfg.loss_chunk = 48
    cfg.seq_len = 64
    with pytest.raises(ValueError, match="loss_chunk=48 must be 0 .* divisor of seq_len=64"):
        load_config(cfg)
