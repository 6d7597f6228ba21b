"""Per-layer optimizer diagnostics: the math against a direct computation, the rows a run writes (metrics.jsonl,
TensorBoard), the same values on a 2x2x2 mesh as on one device, and a training trajectory they leave alone."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infra.metrics import read_metrics
from tests.test_checkpoint import compilation_cache, data_dir, losses, make_config  # noqa: F401
from train.diagnostics import METRICS, group_of, is_diagnostic, parameter_diagnostics
from train.loop import train

ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def _diagnostics(workdir) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if is_diagnostic(k)}
            for r in read_metrics(str(workdir)) if any(is_diagnostic(k) for k in r)}


def _scalar_tags(event_files) -> set[str]:
    """The scalar tags of TensorBoard event files (TFRecords: length, its crc, an Event proto, its crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in event_files:
        data = open(path, "rb").read()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            tags |= {v.tag for v in Event.FromString(data[12:12 + n]).summary.value}
            data = data[12 + n + 4:]
    return tags


def test_the_math_against_a_direct_computation():
    rng = np.random.default_rng(0)
    u_, _, vt = np.linalg.svd(rng.normal(size=(64, 48)), full_matrices=False)
    spectrum = np.concatenate([[3.0], np.geomspace(1.5, 0.01, 47)])  # sigma_1 / sigma_2 = 2: the estimate converges
    update = (u_ * spectrum) @ vt  # [d_model=64, 48] as an MLP input kernel
    params = {"blocks": [{"mlp": {"fc_kernel": rng.normal(size=(64, 48)), "fc_bias": rng.normal(size=48)}}],
              "ln_f": {"scale": rng.normal(size=64)}}
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    updates = {"blocks": [{"mlp": {"fc_kernel": update, "fc_bias": rng.normal(size=48)}}],
               "ln_f": {"scale": rng.normal(size=64)}}
    previous = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    got = {k: float(v) for k, v in parameter_diagnostics(*map(f32, (params, grads, updates, previous))).items()}

    def flat(tree, group):
        return np.concatenate([np.ravel(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
                               if group_of(path)[0] == group])

    for group in ("mlp_in.00", "final_norm"):
        p, g, u, v = (flat(t, group) for t in (params, grads, updates, previous))
        want = {"grad_norm": np.linalg.norm(g), "param_norm": np.linalg.norm(p),
                "update_rms": np.sqrt(np.mean(u ** 2)), "update_ratio": np.linalg.norm(u) / np.linalg.norm(p),
                "update_cos": u @ v / np.linalg.norm(u) / np.linalg.norm(v)}
        for metric, value in want.items():
            assert got[f"{metric}/{group}"] == pytest.approx(value, rel=1e-5), (metric, group)
    assert got["update_sigma_max/mlp_in.00"] == pytest.approx(3.0, rel=1e-4)
    assert got["update_stable_rank/mlp_in.00"] == pytest.approx(np.sum(spectrum ** 2) / 9.0, rel=1e-3)
    assert "update_sigma_max/final_norm" not in got  # vectors have no spectrum
    zero = jax.tree.map(jnp.zeros_like, f32(previous))  # no previous update: no cosine
    assert np.isnan(float(parameter_diagnostics(*map(f32, (params, grads, updates)), zero)["update_cos/final_norm"]))


def test_every_parameter_of_the_model_has_a_group():
    from flax import nnx

    from models.gpt import GPT
    from models.presets import model_config

    _, params = nnx.split(GPT(model_config("cpu-tiny", vocab_size=97), nnx.Rngs(0)), nnx.Param)
    groups = {group_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    names = {g for g, _ in groups}
    assert names == {"embed_token", "embed_pos", "final_norm"} | {
        f"{k}.{i:02d}" for k in ("attn_qkv", "attn_out", "mlp_in", "mlp_out", "norms") for i in (0, 1)}
    assert len({g for g, axis in groups if axis is not None}) == 2 + 4 * 2  # embeddings and projections


@pytest.mark.parametrize("name", ["muon", "celo2"])
def test_a_run_writes_them_and_a_mesh_gives_the_one_device_values(name, data_dir, tmp_path):  # noqa: F811
    plain = make_config(tmp_path / "plain", data_dir, name, steps=6)
    plain.mesh.update(ONE_DEVICE)
    train(plain, devices=jax.devices()[:1])
    one = make_config(tmp_path / "one", data_dir, name, steps=6, diagnostics_every=2)
    one.mesh.update(ONE_DEVICE)
    train(one, devices=jax.devices()[:1])
    assert losses(tmp_path / "one") == losses(tmp_path / "plain")  # the diagnostics leave training alone
    rows = _diagnostics(tmp_path / "one")
    assert sorted(rows) == [2, 4, 6]
    assert not any(k.startswith("update_cos/") for k in rows[2])  # no previous update at the first
    assert {k.split("/")[0] for k in rows[4]} == set(METRICS) and len(rows[4]) == 13 * 5 + 10 * 2
    assert all(np.isfinite(v) for r in rows.values() for v in r.values())
    assert all(0 <= r[f"update_stable_rank/{g}"] for r in rows.values() for g in ("attn_qkv.00", "mlp_out.01"))
    tags = _scalar_tags(glob.glob(str(tmp_path / "one" / "tensorboard" / "events.*")))
    assert "update_ratio/attn_qkv.00" in tags and "update_sigma_max/embed_token" in tags

    mesh = make_config(tmp_path / "mesh", data_dir, name, steps=6, diagnostics_every=2)
    mesh.mesh.update(data=2, fsdp=2, tensor=2)
    train(mesh)
    on_mesh = _diagnostics(tmp_path / "mesh")
    assert sorted(on_mesh) == [2, 4, 6]
    for step, row in rows.items():
        assert on_mesh[step].keys() == row.keys()
        for key, value in row.items():
            assert on_mesh[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
