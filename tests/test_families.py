"""The model families beside GPT-2 (models/gpt.py): the Celo2 paper's modern GPT (RMSNorm without scale, QK-norm,
rotary positions, no biases, untied embeddings) and Llama-style (RMSNorm, rotary, SwiGLU, grouped-query
attention): exact parameter counts, the layers against direct implementations, every attention kernel,
sharded training equal to one device, the optimizers' routing, decoding with a cache, an exact resume."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models.gpt as gpt_module
from models import GPT, count_params, model_config
from models.attention import attend
from models.layers import rotate
from tests.helpers import optimizer_config, run_steps, synthetic_batches, tiny_config
from train.loop import train


def modern_count(V, D, L, F):
    """Token and output tables, per layer q, k, v, out (D x D each) and the MLP (2 D x F); no norm parameters or
    biases."""
    return 2 * V * D + L * (4 * D * D + 2 * D * F)


def llama_count(V, D, L, N, K, F):
    """Token and output tables; per layer q (D x D), k and v (D x K*H each), out (D x D), SwiGLU (3 D x F), two
    norm scales; the final norm's scale."""
    H = D // N
    return 2 * V * D + L * (2 * D * D + 2 * D * K * H + 3 * D * F + 2 * D) + D


@pytest.mark.parametrize("name,count", [
    ("paper-gpt2-small", modern_count(50257, 768, 12, 3072)),  # 162,129,408
    ("paper-gpt3-xl", modern_count(50257, 2048, 24, 8192)),  # 1,413,812,224
    ("cpu-tiny-modern", modern_count(50257, 128, 2, 512)),
    ("cpu-small-modern", modern_count(50257, 256, 4, 1024)),
    ("cpu-tiny-llama", llama_count(50257, 128, 2, 4, 2, 384)),
    ("cpu-small-llama", llama_count(50257, 256, 4, 8, 4, 768)),
])
def test_parameter_counts_follow_the_formula(name, count):
    assert count_params(model_config(name)) == count


def test_paper_presets_are_the_published_shapes_in_the_modern_family():
    xl = model_config("paper-gpt3-xl")
    assert (xl.family, xl.n_layers, xl.d_model, xl.n_heads, xl.head_dim, xl.ctx) == ("modern", 24, 2048, 16, 128, 2048)
    assert xl.mlp_hidden == 4 * 2048 and count_params(xl) == 1_413_812_224
    small = model_config("paper-gpt2-small")
    assert (small.n_layers, small.d_model, small.n_heads, small.ctx) == (12, 768, 12, 1024)
    assert model_config("gpt3-xl", family="modern") == xl  # any preset in any family


def test_rotary_equals_a_rotation_of_each_pair_and_depends_on_relative_position():
    """Pair i = (i, i + H/2) as the complex number a + ib, multiplied by exp(i * p * base^(-2i/H))."""
    H, base = 8, 10000.0
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, H))
    positions = jnp.array([0, 1, 2, 7, 100])
    y = np.asarray(rotate(x, positions, base))
    angles = np.asarray(positions)[:, None] * base ** (-np.arange(H // 2) * 2 / H)
    z = (np.asarray(x[..., :H // 2]) + 1j * np.asarray(x[..., H // 2:])) * np.exp(1j * angles)[None, :, None, :]
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], -1), atol=1e-5)
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, H))
    dot = lambda p, r: float(jnp.sum(rotate(q, jnp.array([p]), base) * rotate(k, jnp.array([r]), base)))
    assert math.isclose(dot(3, 1), dot(12, 10), rel_tol=1e-5) and not math.isclose(dot(3, 1), dot(3, 2), rel_tol=1e-3)


def _reference_block_attention(attn, x, cfg):
    """The modern family's attention written out directly: q, k, v = x W per head; q, k RMS-normalised over the
    head dim, rotated (complex form), causal softmax(q k / sqrt(H)) v; out projection."""
    W = np.asarray(attn.qkv_kernel[...])  # [3, N, D, H]
    q, k, v = np.einsum("bld,kndh->kblnh", np.asarray(x), W)
    rms = lambda t: t / np.sqrt((t ** 2).mean(-1, keepdims=True) + cfg.ln_eps)
    q, k = rms(q), rms(k)
    L, H = x.shape[1], cfg.head_dim
    angles = np.arange(L)[:, None] * cfg.rope_base ** (-np.arange(H // 2) * 2 / H)

    def rot(t):
        z = (t[..., :H // 2] + 1j * t[..., H // 2:]) * np.exp(1j * angles)[None, :, None, :]
        return np.concatenate([z.real, z.imag], -1)

    q, k = rot(q), rot(k)
    scores = np.einsum("binh,bjnh->bnij", q, k) / np.sqrt(H)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.einsum("bnij,bjnh->binh", p, v)
    return np.einsum("blnh,nhd->bld", y, np.asarray(attn.out_kernel[...]))


def test_modern_attention_equals_the_direct_formula():
    cfg = model_config("cpu-tiny-modern", vocab_size=97)
    attn = GPT(cfg, nnx.Rngs(0)).blocks[0].attn
    x = jax.random.normal(jax.random.key(3), (2, 9, cfg.d_model))
    np.testing.assert_allclose(attn(x, None), _reference_block_attention(attn, x, cfg), atol=1e-5)


def test_grouped_query_attention_shares_each_key_value_head_among_its_query_heads():
    """Llama with 2 key/value heads for 4 query heads equals 4 heads whose k and v kernels repeat them."""
    cfg = model_config("cpu-tiny-llama", vocab_size=97)
    grouped = GPT(cfg, nnx.Rngs(0)).blocks[0].attn
    full = GPT(model_config("cpu-tiny-llama", vocab_size=97, n_kv_heads=4), nnx.Rngs(0)).blocks[0].attn
    kv = np.repeat(np.asarray(grouped.kv_kernel[...]), 2, axis=1)  # [2, K, D, H] -> [2, N, D, H]
    full.qkv_kernel[...] = jnp.concatenate([grouped.q_kernel[...][None], kv])
    full.out_kernel[...] = grouped.out_kernel[...]
    x = jax.random.normal(jax.random.key(4), (2, 9, cfg.d_model))
    np.testing.assert_allclose(grouped(x, None), full(x, None), atol=1e-5)


@pytest.mark.parametrize("name", ["cpu-tiny-modern", "cpu-tiny-llama"])
def test_decoding_with_a_kv_cache_gives_the_forward_pass_logits(name):
    model = GPT(model_config(name, vocab_size=97), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 97)
    full = model(tokens)
    cache = model.empty_cache(2, 10)
    assert cache[0].shape == (2, 2, 10, model.cfg.kv_heads, model.cfg.head_dim)
    for t in range(10):
        logits, cache = model.decode(tokens[:, t], t, cache)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kernel", [("cpu-tiny-modern", "splash"), ("cpu-tiny-llama", "pallas_gpu")])
def test_fused_kernels_equal_xla_on_the_family(name, kernel, monkeypatch):
    """Logits and gradients through remat with document segments (the kernels in interpret mode)."""
    tokens = jax.random.randint(jax.random.key(4), (2, 256), 0, 97)
    seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 156], 2, 0), jnp.int32)

    def loss_and_grads(attention):
        model = GPT(model_config(name, vocab_size=97, attention=attention, remat="full"), nnx.Rngs(0))
        return nnx.value_and_grad(lambda m: m(tokens, seg).std())(model)

    loss_ref, g_ref = loss_and_grads("xla")
    monkeypatch.setattr(gpt_module, "attend", functools.partial(attend, interpret=True))
    loss, g = loss_and_grads(kernel)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cudnn_kernel_runs_on_the_family_without_documents(monkeypatch):
    """cuDNN attention needs a GPU: here its entry point is checked to get the family's rotated q and k (it is
    compiled for H100s in tests/test_plan.py)."""
    seen = {}

    def record(q, k, v, segment_ids, *, impl):
        seen.update(impl=impl, q=q)
        return attend(q, k, v, segment_ids, impl="xla")

    monkeypatch.setattr(gpt_module, "attend", record)
    cfg = model_config("cpu-tiny-modern", vocab_size=97, attention="cudnn", document_mask=False,
                       compute_dtype="bfloat16")
    GPT(cfg, nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
    assert seen["impl"] == "cudnn" and seen["q"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name,optimizer", [("cpu-tiny-modern", "muon"), ("cpu-tiny-modern", "celo2"),
                                            ("cpu-tiny-llama", "adamw"), ("cpu-tiny-llama", "muon")])
def test_sharded_run_equals_single_device(name, optimizer):
    batches = synthetic_batches(6)
    _, single, _, _ = run_steps((1, 1, 1), optimizer_config(optimizer), batches, model=name)
    _, sharded, _, _ = run_steps((2, 2, 2), optimizer_config(optimizer), batches, model=name)
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
    assert single[-1] < single[0]


@pytest.mark.parametrize("optimizer", ["muon", "celo2"])
def test_matrix_optimizers_route_per_head_matrices_and_leave_embeddings_to_adamw(optimizer):
    """Muon and Celo2 orthogonalise the per-head q/kv/out kernels and the MLP's matrices; the token and output
    tables and the norm scales take the AdamW branch."""
    from tests.helpers import tiny_run

    run = tiny_run(optimizer_config(optimizer), (1, 1, 1), model="cpu-tiny-llama")
    params = run.layout.abstract.params
    labels = run.optimizer.labels(params)
    flat = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    adam = {k for k, v in flat.items() if v == "adam"}
    assert any("unembed" in k for k in adam) and any("token_embed" in k for k in adam)
    assert all("scale" in k or "embed" in k for k in adam)
    for leaf in ("q_kernel", "kv_kernel", "out_kernel", "gate_kernel", "up_kernel", "proj_kernel"):
        assert any(leaf in k for k in flat if k not in adam), leaf


def test_a_modern_run_resumes_bit_identically(tmp_path, shakespeare):
    """cpu-tiny-modern on Shakespeare on the 2x2x2 mesh: 6 steps straight equal 3 steps, a stop, and 3 more."""
    def rows(workdir):
        return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]

    def config(name):
        cfg = tiny_config(tmp_path / name, shakespeare, steps=6, log_every=1, eval_every=6, checkpoint_every=3)
        cfg.model.name, cfg.optimizer.warmup_steps = "cpu-tiny-modern", 2
        return cfg

    train(config("straight"))
    train(config("resumed"), stop_at=3)
    train(config("resumed"))
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in rows(tmp_path / "straight")]
    assert json.load(open(tmp_path / "straight" / "config.json"))["model"]["name"] == "cpu-tiny-modern"
