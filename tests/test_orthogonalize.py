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


def _copy(state):
    return jax.tree.map(jnp.copy, state)  # the train step donates its state


SLOW = pytest.mark.slow  # Celo2's step compiles for about a minute per mesh on cpu-small; CI keeps one of each


@pytest.mark.parametrize("name,model", [
    ("muon", "cpu-small"), ("celo2", "cpu-tiny"), pytest.param("celo2", "cpu-small", marks=SLOW),
    pytest.param("muon", "cpu-small-modern", marks=SLOW), pytest.param("celo2", "cpu-small-modern", marks=SLOW)])
def test_distributed_update_equals_replicated_across_resume_and_reshard(name, model, tmp_path):
    """Each of four train steps, from the same state, gives every parameter the same value with the matrices
    dealt out as with today's replicated Newton-Schulz (within 1e-6); the run goes on from the distributed
    step on 2x2x2, is resumed from a checkpoint on 1x8x1, then on 8x1x1 (cpu-tiny, cpu-small: GPT-2's per-head
    attention tensors; cpu-small-modern: the paper harness's)."""
    batches = synthetic_batches(4, batch=8, seq=32)
    meshes = [(2, 2, 2), (2, 2, 2), (1, 8, 1), (8, 1, 1)]
    state = start = None
    for i, (mesh_shape, batch) in enumerate(zip(meshes, batches)):
        if i == 0 or mesh_shape != meshes[i - 1]:
            runs = {p: tiny_run(optimizer_config(name, orthogonalize=p), mesh_shape, steps=4, model=model)
                    for p in ("replicated", "distributed")}
            assert {p: r.placement.name for p, r in runs.items()} == {p: p for p in runs}
            if state is None:
                state = runs["distributed"].init_state()
                start = _copy(state.params)
            else:
                ck = Checkpointer(tmp_path / f"ck{i}")
                ck.save(i, state)
                ck.close()
                step, state = Checkpointer(tmp_path / f"ck{i}").restore_latest(runs["distributed"].layout.abstract)
                assert step == i
        with jax.set_mesh(runs["replicated"].mesh):
            batch = jax.device_put(batch, runs["replicated"].batch_sharding)
            want, _ = runs["replicated"].train_step(_copy(state), batch)
            state, _ = runs["distributed"].train_step(state, batch)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(want.params)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"step {i + 1} {jax.tree_util.keystr(path)}")
    assert int(state.step) == 4
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
    assert moved > 1e-3  # the steps moved the params far more than the tolerance
