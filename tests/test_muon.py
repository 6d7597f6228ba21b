import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers as MDN

from models import abstract_params, model_config
from optim.muon import dimension_numbers, muon


def _params():
    _, state = abstract_params(model_config("cpu-tiny", vocab_size=64))
    shapes = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(0), 100))
    return jax.tree.map(lambda s: 0.1 * jax.random.normal(next(keys), s.shape), shapes)


def test_routing_per_head_attention_matrices_and_adamw_for_embeddings_and_vectors():
    dims = dimension_numbers(_params())
    block = dims["blocks"][0]
    assert block["attn"]["qkv_kernel"] == MDN(reduction_axis=2, output_axis=3)  # [3, N, D, H]: D x H per head
    assert block["attn"]["out_kernel"] == MDN(reduction_axis=1, output_axis=2)  # [N, H, D]: H x D per head
    assert block["mlp"]["fc_kernel"] == MDN(0, 1) and block["mlp"]["proj_kernel"] == MDN(0, 1)
    for adam_leaf in (dims["token_embed"], dims["pos_embed"], block["attn"]["qkv_bias"], block["ln1"]["scale"]):
        assert adam_leaf is None


def test_update_equals_optax_contrib_muon_with_explicit_dimension_numbers():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    explicit = jax.tree.map(lambda d: d, dimension_numbers(params), is_leaf=lambda x: x is None or isinstance(x, MDN))
    ours = muon(0.02, 0.003, weight_decay=0.1)
    ref = optax.contrib.muon(0.02, adam_learning_rate=0.003, weight_decay=0.1, adam_b2=0.95,
                             muon_weight_dimension_numbers=explicit)
    s1, s2 = ours.init(params), ref.init(params)
    # the same state tree as optax's muon: checkpoints of either restore into the other
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for _ in range(2):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        # the same math; float32 rounding differs where XLA fuses the iterations differently (updates ~1e-2)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the per-head matrices really are orthogonalised independently: each D x H slice of the qkv
    # update has singular values near the same value (Newton-Schulz output) times the shape scale
    upd = u1["blocks"][0]["attn"]["qkv_kernel"]
    sv = np.linalg.svd(np.asarray(upd[0, 0]), compute_uv=False)
    assert sv.max() / sv.min() < 2.5
