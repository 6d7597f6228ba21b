import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import GPT, RULES, abstract_params, count_params, model_config, param_specs

PUBLISHED = {
    "gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200, "gpt3-small": 125_226_240, "gpt3-medium": 355_871_744,
    "gpt3-large": 760_300_032, "gpt3-xl": 1_315_723_264,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_published_parameter_counts(name, count):
    assert count_params(model_config(name)) == count


def test_python_m_models_prints_the_table(capsys):
    from models.__main__ import main

    main()
    out = capsys.readouterr().out
    for name, count in PUBLISHED.items():
        assert name in out and f"{count:,}" in out


def test_every_param_has_logical_axes_mapped_by_the_rules():
    _, params = abstract_params(model_config("gpt3-xl"))
    specs = param_specs(params)
    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
    for (path, p), spec in zip(flat, jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert len(spec) == p.ndim, jax.tree_util.keystr(path)
    d = specs
    assert d["token_embed"] == P(RULES["vocab"], RULES["embed"])
    assert d["blocks"][0]["attn"]["qkv_kernel"] == P(None, "tensor", "fsdp", None)
    assert d["blocks"][0]["attn"]["out_kernel"] == P("tensor", None, "fsdp")
    assert d["blocks"][0]["mlp"]["fc_kernel"] == P("fsdp", "tensor")
    # heads are a leading axis of the attention kernels; biases and norms are vectors
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(params))
    assert shapes["blocks"][0]["attn"]["qkv_kernel"] == (3, 16, 2048, 128)
    assert shapes["blocks"][0]["attn"]["out_kernel"] == (16, 128, 2048)
    vectors = [k for k, v in jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
               if "bias" in jax.tree_util.keystr(k) or "scale" in jax.tree_util.keystr(k)]
    assert vectors and all(len(v) == 1 for k, v in jax.tree_util.tree_leaves_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)) if "bias" in jax.tree_util.keystr(k))


def _tiny(**kw):
    return GPT(model_config("cpu-tiny", vocab_size=97, **kw), nnx.Rngs(0))


def test_forward_shapes_and_causality():
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
    logits = model(tokens)
    assert logits.shape == (2, 16, 97) and logits.dtype == jnp.float32
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 97)
    np.testing.assert_allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
    assert not np.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_decoding_with_a_kv_cache_gives_the_forward_pass_logits():
    """Position by position through ``GPT.decode`` (each position's keys and values cached once) equals the
    whole sequence through the model, at every position."""
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 97)
    full = model(tokens)
    cache = model.empty_cache(2, 12)
    for t in range(12):
        logits, cache = model.decode(tokens[:, t], t, cache)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)



def test_batched_generation_with_a_cache_equals_the_sliding_window():
    """Prompts of different lengths decoded as one batch with the KV cache give, greedily, the tokens each
    prompt gets alone without a cache, also past the context (ctx 24: the last tokens come from the window)."""
    from tools.sample import Settings, generate

    model = _tiny(ctx=24)
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = [[1, 5, 9], [1, 7, 3, 3, 8, 2, 11], [1]]
    kw = dict(max_tokens=30, ctx=24, vocab_limit=90, settings=Settings(temperature=0.0))
    batched = generate(graphdef, params, prompts, **kw)
    assert batched.shape == (3, 30) and batched.max() < 90
    for row, prompt in zip(batched, prompts):
        np.testing.assert_array_equal(row, generate(graphdef, params, [prompt], cache=False, **kw)[0])
    short = generate(graphdef, params, prompts, **{**kw, "max_tokens": 10})  # within the context: cache only
    np.testing.assert_array_equal(short, batched[:, :10])
    sampled = generate(graphdef, params, prompts, **{**kw, "settings": Settings(temperature=1.0, top_k=0)})
    assert sampled.shape == (3, 30) and sampled.max() < 90 and not np.array_equal(sampled, batched)

def test_document_mask_isolates_documents():
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, 97)
    seg = jnp.array([[1] * 6 + [2] * 10])
    other_first_doc = tokens.at[:, :6].set((tokens[:, :6] + 5) % 97)
    a, b = model(tokens, seg), model(other_first_doc, seg)
    np.testing.assert_allclose(a[:, 6:], b[:, 6:], atol=1e-5)  # doc 2 does not see doc 1
    c = model(tokens)  # without segment ids attention crosses the boundary
    assert not np.allclose(a[:, 6:], c[:, 6:], atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_remat_is_exact():
    model = _tiny(compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 97)
    ref = _tiny()(tokens)
    np.testing.assert_allclose(model(tokens), ref, atol=0.1)

    def loss(m):
        return m(tokens).mean()

    g_plain = nnx.grad(loss)(_tiny())
    g_remat = nnx.grad(loss)(_tiny(remat="full"))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_model_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("gpt4")
    with pytest.raises(ValueError, match="remat"):
        model_config("cpu-tiny", remat="sometimes")
    with pytest.raises(ValueError, match="unknown model config fields"):
        model_config("cpu-tiny", n_experts=8)
