"""The attention kernels of models/attention.py against the XLA reference, on CPU.

The Pallas kernels run in interpret mode here: splash (TPU) and pallas_gpu (Triton) both do, forward and
backward, so their numerics are checked exactly on this machine. cuDNN needs an NVIDIA GPU: only its refusal
to mask documents is tested. The slow test compiles a train step with splash for a deviceless TPU topology
(libtpu required).
"""
import functools
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs.base import base_config
from models import GPT, MESH_AXES, attend, model_config
from models import attention as models_attention
from models import gpt as gpt_module
from train.build import Run, build_model_config, build_run
from train.config import load_config

# quiet libtpu's logs (if installed, it loads with the first backend; its start-up warnings about
# TPU_WORKER_HOSTNAMES on a host without TPUs are printed regardless and are harmless)
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

FUSED = ("splash", "pallas_gpu")
# values and gradients are O(1); measured max errors: float32 ~2e-6, bfloat16 ~2e-2 (as large as XLA's own in bf16)
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(B, L, N, H, dtype, seed=0):
    return tuple(jax.random.normal(k, (B, L, N, H), jnp.float32).astype(dtype)
                 for k in jax.random.split(jax.random.key(seed), 3))


def _segments(B, L, seed=0):
    """Packed rows: runs of equal ids, about one document start every 25 tokens, at random positions."""
    starts = np.random.default_rng(seed).random((B, L)) < 0.04
    ids = np.cumsum(starts, axis=1).astype(np.int32)
    assert (ids.max(axis=1) - ids.min(axis=1) >= 3).all()  # several documents in every row
    return jnp.asarray(ids)


def _value_and_vjp_of(f, q, k, v):
    """Output and gradients of <f(q, k, v), ct> w.r.t. q, k, v for a fixed random cotangent ct (values exact
    in bfloat16, so that both dtypes see the same ct)."""
    y, vjp = jax.vjp(jax.jit(f), q, k, v)
    ct = jax.random.normal(jax.random.key(9), y.shape, jnp.float32).astype(jnp.bfloat16).astype(y.dtype)
    return y, vjp(ct)


def _value_and_vjp(impl, q, k, v, seg, interpret):
    """``_value_and_vjp_of`` attention by ``impl``."""
    return _value_and_vjp_of(lambda q, k, v: attend(q, k, v, seg, impl=impl, interpret=interpret), q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", FUSED)
def test_fused_kernel_matches_xla_within_documents(impl, dtype):
    q, k, v = _qkv(2, 256, 2, 32, dtype)
    seg = _segments(2, 256)
    y, grads = _value_and_vjp(impl, q, k, v, seg, interpret=True)
    # the reference in float32 from the same (rounded) inputs
    y_ref, grads_ref = _value_and_vjp("xla", *(x.astype(jnp.float32) for x in (q, k, v)), seg, interpret=False)
    assert y.dtype == dtype and y.shape == q.shape
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, **TOL[dtype])
    for g, g_ref, name in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(g.astype(jnp.float32), g_ref, **TOL[dtype], err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("documents", [True, False])
def test_xla_attention_equals_jax_dot_product_attention(documents, dtype):
    """The einsum formulation against jax.nn.dot_product_attention (the same formula, JAX's code)."""
    q, k, v = _qkv(2, 128, 4, 16, dtype, seed=2)
    seg = _segments(2, 128, seed=2) if documents else None
    mask = dict(mask=models_attention.attention_mask(seg)) if documents else dict(is_causal=True)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, **mask)

    y, grads = _value_and_vjp("xla", q, k, v, seg, interpret=False)
    y_ref, grads_ref = _value_and_vjp_of(reference, q, k, v)
    assert y.dtype == dtype
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), **TOL[dtype])


@pytest.mark.parametrize("impl", FUSED)
def test_fused_kernel_without_segment_ids_is_causal(impl):
    q, k, v = _qkv(1, 256, 2, 32, jnp.float32, seed=1)
    y = attend(q, k, v, None, impl=impl, interpret=True)
    np.testing.assert_allclose(y, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    # and documents do matter: the same inputs with segment ids give another result
    assert not np.allclose(attend(q, k, v, _segments(1, 256), impl=impl, interpret=True), y, atol=1e-3)


@pytest.mark.parametrize("impl", FUSED)
def test_sharded_kernel_equals_unsharded(impl):
    """Under a (data=2, fsdp=2, tensor=2) mesh the kernel runs per device in shard_map (rows over data x fsdp,
    heads over tensor); values and gradients equal the single-device ones."""
    q, k, v = _qkv(4, 256, 2, 32, jnp.float32, seed=2)
    seg = _segments(4, 256, seed=2)
    y1, g1 = _value_and_vjp(impl, q, k, v, seg, interpret=True)
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    qkv_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q8, k8, v8 = (jax.device_put(x, qkv_sharding) for x in (q, k, v))
    seg8 = jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda q, k, v, s: attend(q, k, v, s, impl=impl, interpret=True))(q8, k8, v8, seg8)
        y8, g8 = _value_and_vjp(impl, q8, k8, v8, seg8, interpret=True)
    assert "shard_map" in str(jaxpr)
    assert y8.sharding.is_equivalent_to(qkv_sharding, 4)
    np.testing.assert_allclose(y8, y1, atol=1e-6, rtol=1e-6)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_gpt_with_splash_equals_gpt_with_xla(monkeypatch):
    """The model hands its segment ids to the kernel (per block, through remat): same logits and gradients."""
    tokens = jax.random.randint(jax.random.key(4), (2, 256), 0, 97)
    seg = _segments(2, 256, seed=4)

    def loss_and_grads(attention):
        model = GPT(model_config("cpu-tiny", vocab_size=97, attention=attention, remat="full"), nnx.Rngs(0))
        return nnx.value_and_grad(lambda m: m(tokens, seg).std())(model)

    loss_ref, g_ref = loss_and_grads("xla")
    monkeypatch.setattr(gpt_module, "attend", functools.partial(attend, interpret=True))
    loss, g = loss_and_grads("splash")
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cudnn_cannot_mask_documents():
    with pytest.raises(ValueError, match=r"cannot mask documents.*document_mask=False.*'pallas_gpu'"):
        model_config("cpu-tiny", attention="cudnn", compute_dtype="bfloat16")
    q, k, v = _qkv(1, 128, 1, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match="cannot mask documents"):
        attend(q, k, v, _segments(1, 128), impl="cudnn")
    with pytest.raises(ValueError, match="bfloat16"):
        model_config("cpu-tiny", attention="cudnn", document_mask=False)
    assert model_config("cpu-tiny", attention="cudnn", document_mask=False, compute_dtype="bfloat16")


def test_unknown_or_unresolved_attention_is_rejected():
    with pytest.raises(ValueError, match=r"model.attention='flash' is not one of \['xla', 'splash', 'pallas_gpu', "
                                         r"'cudnn'\]"):
        model_config("cpu-tiny", attention="flash")
    with pytest.raises(ValueError, match="'auto' is resolved from the devices' platform by train.build"):
        model_config("cpu-tiny", attention="auto")
    q, k, v = _qkv(1, 128, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attend(q, k, v, None, impl="flash")


def _cfg(**model):
    cfg = base_config()
    cfg.model.update(name="cpu-tiny", vocab_size=512, **model)
    return cfg


@pytest.mark.parametrize("platform,model,expected", [
    ("tpu", {}, "splash"),
    ("gpu", {}, "pallas_gpu"),  # documents are masked: cuDNN cannot
    ("gpu", dict(document_mask=False, compute_dtype="bfloat16"), "cudnn"),
    ("gpu", dict(document_mask=False), "pallas_gpu"),  # float32: cuDNN takes bfloat16 only
    ("cpu", {}, "xla"),
    ("tpu", dict(attention="xla"), "xla"),  # an explicit choice is kept
])
def test_auto_attention_follows_the_platform(platform, model, expected):
    assert build_model_config(_cfg(**model), platform).attention == expected


@pytest.mark.parametrize("impl,platform,message", [
    ("splash", "cpu", "model.attention='splash' runs on TPU only; on CPU use xla"),
    ("pallas_gpu", "tpu", "model.attention='pallas_gpu' runs on GPU only; on TPU use xla or splash"),
    ("cudnn", "cpu", "runs on GPU only; on CPU use xla"),
])
def test_a_kernel_named_for_another_platform_is_refused_with_those_that_run(impl, platform, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model_config(_cfg(attention=impl, compute_dtype="bfloat16"), platform)


def test_run_resolves_attention_from_its_devices():
    assert Run(_cfg()).model_cfg.attention == "xla"  # this machine's devices: CPU
    tpu_chip = types.SimpleNamespace(platform="tpu")
    assert Run(_cfg(), [tpu_chip] * 4).model_cfg.attention == "splash"


def test_fused_attention_needs_whole_blocks():
    cfg = _cfg()
    cfg.seq_len = 200
    with pytest.raises(ValueError, match=r"attention='splash' needs a sequence length that is a multiple of 128"):
        build_model_config(cfg, "tpu")
    assert build_model_config(cfg, "cpu").attention == "xla"
    q, k, v = _qkv(1, 200, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        attend(q, k, v, None, impl="pallas_gpu", interpret=True)


@pytest.mark.slow
def test_splash_train_step_compiles_for_tpu(tmp_path):
    """The planner's path: a Run on abstract v5p chips resolves 'auto' to splash, and its sharded train step
    (forward, backward, AdamW) lowers and compiles for TPU with the Pallas kernel in it."""
    pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu (pip install 'jax[tpu]')")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    cfg = _cfg(compute_dtype="bfloat16", remat="full")
    cfg.update(workdir=str(tmp_path), batch_size=4, seq_len=256)
    cfg.mesh.update(data=1, fsdp=2, tensor=2)
    run = build_run(load_config(cfg), devices)
    assert run.model_cfg.attention == "splash"
    batch = {k: jax.ShapeDtypeStruct((4, 256), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=run.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "loss_mask")}
    # the test session's default precision "highest" would ask Mosaic for float32 contraction of the bfloat16
    # blocks, which it refuses ("Bad lhs type"); runs use the default
    with jax.set_mesh(run.mesh), jax.default_matmul_precision("default"):
        compiled = run.train_step.lower(run.layout.abstract, batch).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
