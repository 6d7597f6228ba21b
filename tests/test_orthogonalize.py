"""The distributed Newton-Schulz placement (optim/orthogonalize.py) gives today's replicated updates."""
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from infra.checkpoint import Checkpointer
from optim.orthogonalize import (AUTO_MIN_ELEMENTS, QUINTIC_COEFFS, REPLICATED, Placement, make_placement,
                                 newton_schulz, orthogonalize_matrices)
from tests.helpers import optimizer_config, synthetic_batches, tiny_run

MESHES = [(2, 2, 2), (8, 1, 1), (1, 8, 1)]
# wide, tall, per-head (leading axes), a batch that does not divide the devices (padding), a vector (untouched)
LEAVES = {"qkv": ((3, 4, 64, 16), P(None, "tensor", "fsdp", None)), "out": ((4, 16, 64), P("tensor", None, "fsdp")),
          "fc": ((64, 256), P("fsdp", "tensor")), "proj": ((256, 64), P("tensor", "fsdp")),
          "odd": ((5, 24, 40), P(None, "fsdp", None)), "bias": ((64,), P(None))}
NS = partial(newton_schulz, coeffs=QUINTIC_COEFFS, iters=5, eps=1e-8)


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _collectives(compiled) -> dict:
    text = compiled.as_text()
    return {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in ("all-gather", "all-to-all")}


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_distributed_equals_replicated_and_keeps_the_layout(mesh_shape):
    mesh = _mesh(mesh_shape)
    keys = iter(jax.random.split(jax.random.key(0), len(LEAVES)))
    tree = {k: jax.device_put(jax.random.normal(next(keys), shape), NamedSharding(mesh, spec))
            for k, (shape, spec) in LEAVES.items()}
    specs = {k: spec for k, (_, spec) in LEAVES.items()}
    placement = make_placement("distributed", mesh, tree, specs)
    assert placement.distributed and placement.specs["['qkv']"] == LEAVES["qkv"][1]
    out = {}
    for p in (REPLICATED, placement):
        f = jax.jit(lambda t, p=p: orthogonalize_matrices(t, NS, p))
        out[p.name] = f(tree)
        for k, v in out[p.name].items():
            assert v.sharding.is_equivalent_to(tree[k].sharding, v.ndim), (p.name, k, v.sharding)
        if p.distributed and mesh_shape == (1, 8, 1):
            # FSDP shards go to the devices that orthogonalise them and back by all-to-all, once per matrix
            # shape (16 x 64, 64 x 256, 24 x 40); no matrix is gathered whole
            assert _collectives(f.lower(tree).compile()) == {"all-gather": 0, "all-to-all": 6}
    for k in LEAVES:
        np.testing.assert_allclose(out["distributed"][k], out["replicated"][k], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["distributed"]["bias"], tree["bias"])
    # each matrix, tall or wide, is orthogonalised on its own: the rows of a wide slice are orthonormal-ish
    s = np.linalg.svd(np.asarray(out["distributed"]["qkv"][1, 2]), compute_uv=False)
    assert 0.5 < s.min() and s.max() < 1.5


def test_auto_picks_by_mesh_and_size():
    small = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    big = {"w": jax.ShapeDtypeStruct((AUTO_MIN_ELEMENTS // 256, 256), jnp.float32)}
    specs = {"w": P("fsdp", None)}
    assert make_placement("auto", _mesh((1, 8, 1)), big, specs).distributed
    assert not make_placement("auto", _mesh((1, 8, 1)), small, specs).distributed
    one = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    assert not make_placement("auto", one, big, specs).distributed
    assert not make_placement("replicated", _mesh((1, 8, 1)), big, specs).distributed
    with pytest.raises(ValueError, match="optimizer.orthogonalize='scattered' is not one of auto, replicated"):
        make_placement("scattered", one, big, specs)


def _train(name, model, meshes, orthogonalize, batches, tmp_path):
    """Train on ``batches``, the i-th on ``meshes[i]``: a checkpoint saved and restored between meshes."""
    state = None
    for i, (mesh_shape, batch) in enumerate(zip(meshes, batches)):
        run = tiny_run(optimizer_config(name, orthogonalize=orthogonalize), mesh_shape, steps=len(batches),
                       model=model)
        assert run.placement.name == orthogonalize
        if state is None:
            state = run.init_state()
        elif meshes[i] != meshes[i - 1]:
            ck = Checkpointer(tmp_path / f"ck{i}")
            ck.save(i, state)
            ck.close()
            step, state = Checkpointer(tmp_path / f"ck{i}").restore_latest(run.layout.abstract)
            assert step == i
        with jax.set_mesh(run.mesh):
            state, _ = run.train_step(state, jax.device_put(batch, run.batch_sharding))
    return state


@pytest.mark.parametrize("model", ["cpu-small", "cpu-small-modern"])
@pytest.mark.parametrize("name", ["muon", "celo2"])
def test_training_distributed_equals_replicated_across_resume_and_reshard(name, model, tmp_path):
    """Four steps with the matrices dealt out (2x2x2, then resumed on 1x8x1, then on 8x1x1) give every
    parameter of four replicated steps on 2x2x2 within 1e-6 (cpu-small: GPT-2's per-head attention tensors;
    cpu-small-modern: the paper harness's)."""
    batches = synthetic_batches(4, batch=8, seq=32)
    want = _train(name, model, [(2, 2, 2)] * 4, "replicated", batches, tmp_path / "r")
    got = _train(name, model, [(2, 2, 2), (2, 2, 2), (1, 8, 1), (8, 1, 1)], "distributed", batches, tmp_path / "d")
    assert int(got.step) == 4
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
    start = tiny_run(optimizer_config(name), (2, 2, 2), steps=4, model=model).init_state().params
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(start)))
    assert moved > 1e-3  # the steps moved the params far more than the tolerance
