"""Official weight-file layouts load as published, files written here load the way the official code loads
them, and ``python -m optim.learned.weights`` inspects and converts them.

The expected official trees are built here from the official naming rules, not from the project's constants:
- Haiku names parameters "<module path>/<param>" with top-level modules "linear", "linear_1", ...; a module
  created inside another module's ``__call__`` is "<parent>/<child>", one created in its ``__init__`` is
  "<parent>/~/<child>", and parameters created outside any module sit under "~". learned_optimization's
  ``HyperV2`` creates ``hk.LSTM(name="rnn")`` in its call, and ``hk.LSTM`` creates its gate Linear in its own
  call, so the gate Linear is "rnn/linear".
- ``lstm_init_state`` is Haiku's ``LSTMState(hidden, cell)`` namedtuple; flax writes a namedtuple as a map of
  its fields.
- learned_optimization's outer training saves ``ParameterCheckpoint(params, gen_id, step)``; its readers (and
  the official Celo2 ``load_checkpoint``) call ``flax.serialization.from_bytes(template, bytes)``, which
  matches by key: a file loads in the official code if ``from_bytes`` of the official template accepts it.
"""
import collections
import json

import flax.serialization
import jax
import numpy as np
import optax
import pytest

from optim import registry
from optim.learned import velo as velo_lib
from optim.learned.celo2_file import THETA_SHAPES, load_theta, save_theta
from optim.learned.velo_file import load_velo_theta, save_velo_theta
from optim.learned.weights.__main__ import main as weights_cli

K, H, F = 4, 8, 30  # param_inits, lstm_hidden_size, per-tensor features (small, to keep files tiny)
SIZES = dict(param_inits=K, lstm_hidden_size=H)
LSTMState = collections.namedtuple("LSTMState", ["hidden", "cell"])
ParameterCheckpoint = collections.namedtuple("ParameterCheckpoint", ["params", "gen_id", "step"])


def official_velo_tree(seed=0, lstm_key="rnn/linear"):
    """HyperV2's parameters as Haiku names them (module docstring), random values."""
    rng = np.random.default_rng(seed)
    a = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    widths = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)  # the 14 feature blocks (docs/learned_optimizers.md#features)
    ff = {f"w0__{i}": a(K, w, 4) for i, w in enumerate(widths)}
    ff.update(b0=a(K, 4), w1=a(K, 4, 4), b1=a(K, 4), w2=a(K, 4, 3), b2=a(K, 3))
    return {"lstm_init_state": LSTMState(a(1, H), a(1, H)),
            "rnn_params": {"linear": {"w": a(F, H), "b": a(H)}, "linear_1": {"w": a(F, H), "b": a(H)},
                           "linear_2": {"w": a(F, H), "b": a(H)}, lstm_key: {"w": a(2 * H, 4 * H), "b": a(4 * H)},
                           "rnn_to_controls": {"w": a(H, K), "b": a(K)}, "step_size": {"w": a(H, 1), "b": a(1)}},
            "ff_mod_stack": {"~": ff}}


def assert_same_values(loaded, official):
    """``loaded`` (this project's dict) holds ``official``'s arrays under the same names."""
    official = flax.serialization.to_state_dict(official)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)}
    got, want = flat(loaded), flat(official)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_official_velo_file_loads(tmp_path):
    tree = official_velo_tree()
    path = tmp_path / "params"
    path.write_bytes(flax.serialization.to_bytes(tree))
    assert_same_values(load_velo_theta(path, **SIZES), tree)


def test_velo_written_here_loads_in_the_official_reader(tmp_path):
    tree = official_velo_tree()
    path = tmp_path / "params"
    path.write_bytes(flax.serialization.to_bytes(tree))
    save_velo_theta(tmp_path / "ours", load_velo_theta(path, **SIZES))
    template = official_velo_tree(seed=1)  # the official reader's template: right names, other values
    restored = flax.serialization.from_bytes(template, (tmp_path / "ours").read_bytes())
    assert_same_values(flax.serialization.to_state_dict(restored), tree)
    assert "rnn/linear" in flax.serialization.msgpack_restore((tmp_path / "ours").read_bytes())["rnn_params"]


def test_wrapped_velo_checkpoint_round_trip(tmp_path):
    tree = official_velo_tree()
    path = tmp_path / "checkpoint"
    path.write_bytes(flax.serialization.to_bytes(ParameterCheckpoint(tree, "gen-17", np.int64(1200))))
    theta = load_velo_theta(path, **SIZES)
    assert_same_values(theta, tree)
    save_velo_theta(tmp_path / "wrapped", theta, layout="wrapped")
    template = ParameterCheckpoint(official_velo_tree(seed=1), "", 0)
    restored = flax.serialization.from_bytes(template, (tmp_path / "wrapped").read_bytes())
    assert_same_values(flax.serialization.to_state_dict(restored.params), tree)


def test_legacy_velo_file_still_loads(tmp_path):
    """Files this project wrote before 2026-11-29 put the gate Linear under "rnn/~/linear"."""
    legacy = official_velo_tree(lstm_key="rnn/~/linear")
    path = tmp_path / "legacy"
    path.write_bytes(flax.serialization.to_bytes(legacy))
    theta = load_velo_theta(path, **SIZES)
    np.testing.assert_array_equal(theta["rnn_params"]["rnn/linear"]["w"], legacy["rnn_params"]["rnn/~/linear"]["w"])


def test_shipped_velo_weights_are_in_the_official_layout():
    raw = flax.serialization.msgpack_restore(registry.get("velo").weights.shipped.read_bytes())
    assert sorted(raw["rnn_params"]) == ["linear", "linear_1", "linear_2", "rnn/linear", "rnn_to_controls",
                                         "step_size"]


def test_velo_takes_the_loss_as_learned_optimization_passes_it():
    theta = velo_lib.init_velo_theta(jax.random.PRNGKey(0), **SIZES)
    tx = velo_lib.velo(theta, 10, weight_decay=0.01, **SIZES)
    params = {"w": jax.numpy.ones((4, 6)), "b": jax.numpy.zeros(6)}
    grads = jax.tree.map(lambda p: 0.1 * jax.numpy.ones_like(p), params)
    state = tx.init(params)
    a, _ = tx.update(grads, state, params, loss=2.5)
    b, _ = tx.update(grads, state, params, extra_args={"loss": 2.5})
    jax.tree.map(np.testing.assert_array_equal, a, b)
    chain = optax.chain(velo_lib.velo(theta, 10, **SIZES), optax.scale(1.0))
    c, _ = chain.update(grads, chain.init(params), params, extra_args={"loss": 2.5})
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(c))
    with pytest.raises(ValueError, match="extra_args"):
        tx.update(grads, state, params)


# --- Celo2: a downloaded directory with the official config.json ----------------------------------------


def _celo2_dir(tmp_path, optimizer):
    """A model repository as the official meta-training writes it: theta.state and its absl flags."""
    theta = {k: np.full(s, 0.01, np.float32) for k, s in THETA_SHAPES.items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_theta(tmp_path / "theta.state", theta)
    flags = {"optimizer": optimizer, "task": "fast_velo", "trainer": "pes", "outer_lr": 5e-05, "step_mult": 0.001,
             "weight_decay": 0.0, "regex_1d": "/b$", "seed": 0}
    (tmp_path / "config.json").write_text(json.dumps(flags, indent=4))
    return tmp_path


def test_celo2_directory_with_matching_config_loads(tmp_path):
    d = _celo2_dir(tmp_path, "celo2base")  # the official code's name of Celo2-base
    assert load_theta(d, "celo2_base")["w1"].shape == (8, 8)
    tx = registry.get("celo2_base").build({"theta": str(d)}, {"weight_decay": 0.0}, 1e-3, 10)  # theta=<directory>
    assert tx.init({"w": jax.numpy.ones((4, 4))}) is not None


@pytest.mark.parametrize("optimizer,match", [
    ("celo2base", r"optimizer='celo2base'\) but used as celo2.*--config.optimizer.name=celo2_base"),
    ("celo", r"meta-trained as celo .*not Celo2 weights"),
])
def test_celo2_directory_with_another_config_is_refused(tmp_path, optimizer, match):
    d = _celo2_dir(tmp_path, optimizer)
    with pytest.raises(ValueError, match=match):  # a configured optimizer reads its theta through its record
        registry.get("celo2").build(dict(registry.get("celo2").settings, theta=str(d)), {"weight_decay": 0.0},
                                    1e-3, 10)


def test_celo2_directory_without_theta_is_refused(tmp_path):
    with pytest.raises(ValueError, match="directory without a theta.state"):
        load_theta(tmp_path, "celo2")


# --- python -m optim.learned.weights ------------------------------------------------------------------------------


def test_inspect_and_convert(tmp_path, capsys):
    wrapped = tmp_path / "checkpoint"
    wrapped.write_bytes(flax.serialization.to_bytes(ParameterCheckpoint(official_velo_tree(), "g", np.int64(3))))
    assert weights_cli(["inspect", str(wrapped)]) == 0
    out = capsys.readouterr().out
    assert "layout      wrapped (gen_id 'g', step 3)" in out and "velo (param_inits 4, lstm_hidden_size 8)" in out
    assert "params/rnn_params/rnn/linear/w" in out and f"parameters  {_count(official_velo_tree()):,}" in out
    values = out.split("values ")[1].split()[0]
    assert weights_cli(["convert", str(wrapped), str(tmp_path / "bare")]) == 0
    assert weights_cli(["inspect", str(tmp_path / "bare")]) == 0
    out = capsys.readouterr().out
    assert "layout      official" in out and f"values {values}" in out  # same weights, other layout
    assert weights_cli(["inspect", str(_celo2_dir(tmp_path / "c", "celo2"))]) == 0
    out = capsys.readouterr().out
    assert "celo2 (" in out and "parameters  347 in 19 arrays" in out and "ff_mod_stack/~/w0__13" in out


def _count(tree):
    return sum(np.size(x) for x in jax.tree.leaves(flax.serialization.to_state_dict(tree)))


@pytest.mark.parametrize("content,match", [
    (lambda: flax.serialization.to_bytes({"weights": np.zeros(3, np.float32)}), "unknown weight-file layout"),
    (lambda: flax.serialization.to_bytes(official_velo_tree())[:-50], "not a valid msgpack"),
    (lambda: b"not a weight file", "not a valid msgpack"),
])
def test_cli_bad_files_end_with_one_line(tmp_path, capsys, content, match):
    path = tmp_path / "f"
    path.write_bytes(content())
    assert weights_cli(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and match in err
