"""VeLO: parameter count, weight files, agreement with a literal transcription of the official code, the
optax contract (loss via extra args, determinism, state shapes), sharding, the harness entry, and the
shipped weights training the CPU language-model preset."""
import collections
import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from optim import registry
from optim.learned import velo as velo_lib
from optim.learned.celo2 import THETA_SHAPES, factored_dims, save_theta
from optim.learned.velo import init_velo_theta, load_velo_theta, save_velo_theta, scale_by_velo, velo
from optim.learned.velo_file import count_params, velo_theta_from_bytes, velo_theta_shapes, velo_theta_to_bytes
from optim.sharding import state_specs

SMALL = dict(param_inits=8, lstm_hidden_size=16)  # a small hyper-network keeps the numpy reference fast
LM_LOSS_DROP = 0.3  # nats/token the shipped weights must take off the cpu-tiny loss in 40 steps (they take 0.46)


@pytest.fixture(scope="module")
def official_theta():
    return init_velo_theta(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def small_theta():
    return init_velo_theta(jax.random.PRNGKey(1), **SMALL)


@pytest.fixture(scope="module")
def small_rule(small_theta):
    """scale_by_velo(num_steps=50) and its jitted update, shared so that SHAPES compiles once."""
    tx = scale_by_velo(small_theta, 50, **SMALL)
    return tx, jax.jit(tx.update)


def problem(shapes, seed=0, steps=3):
    """Params (float32) and a list of gradient trees; shapes without ties so factored_dims is unambiguous."""
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(0.1 * rng.standard_normal(s) + 0.02, jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(0.01 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
             for _ in range(steps)]
    return params, grads


SHAPES = {"w": (8, 12), "t": (2, 8, 4), "b": (16,), "s": ()}  # a matrix, an N-d tensor, a vector, a scalar
LOSSES = [3.0, 2.5, 2.7, 2.2]


def run(tx, params, grads, losses, update=None):
    update = update or jax.jit(tx.update)
    state, steps = tx.init(params), []
    for g, loss in zip(grads, losses):
        step, state = update(g, state, params, loss=loss)
        steps.append(step)
    return steps, state


# --- parameter count and weight files ------------------------------------------------------------------


def test_official_parameter_count_and_breakdown():
    shapes = velo_theta_shapes()
    rnn = shapes["rnn_params"]
    breakdown = {
        "3 mixing Linears (30 -> 512)": sum(count_params(rnn[k]) for k in ("linear", "linear_1", "linear_2")),
        "LSTM (512 + 512 -> 4 x 512)": count_params(rnn["rnn/linear"]),
        "rnn_to_controls (512 -> 256)": count_params(rnn["rnn_to_controls"]),
        "step_size (512 -> 1)": count_params(rnn["step_size"]),
        "lstm_init_state": count_params(shapes["lstm_init_state"]),
        "ff_mod_stack (256 x 159)": count_params(shapes["ff_mod_stack"]),
    }
    print("\n" + "\n".join(f"{k:<32}{v:>10,}" for k, v in breakdown.items()))
    assert breakdown == {
        "3 mixing Linears (30 -> 512)": 3 * 15_872,  # not 3 x 14,848 (28 inputs): see velo_file
        "LSTM (512 + 512 -> 4 x 512)": 2_099_200,
        "rnn_to_controls (512 -> 256)": 131_328,
        "step_size (512 -> 1)": 513,
        "lstm_init_state": 1_024,
        "ff_mod_stack (256 x 159)": 40_704,
    }
    assert count_params(shapes) == sum(breakdown.values()) == 2_320_385  # ~2.32 M, 9.3 MB in float32


def test_weight_file_round_trip_and_flax_bytes(official_theta, tmp_path):
    path = tmp_path / "velo.state"
    save_velo_theta(path, official_theta)
    buf = path.read_bytes()
    assert buf == flax.serialization.to_bytes(official_theta)  # the official writer's exact bytes
    loaded = load_velo_theta(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, official_theta))
    assert list(loaded) == ["lstm_init_state", "rnn_params", "ff_mod_stack"]


def test_hand_built_official_tree_loads(official_theta, tmp_path):
    """Built as learned_optimization does: Haiku's LSTMState namedtuple, keys in sorted (tree-op) order."""
    LSTMState = collections.namedtuple("LSTMState", ["hidden", "cell"])
    init_state = official_theta["lstm_init_state"]
    tree = {
        "ff_mod_stack": {"~": {k: np.asarray(official_theta["ff_mod_stack"]["~"][k])
                               for k in sorted(official_theta["ff_mod_stack"]["~"])}},
        "lstm_init_state": LSTMState(np.full((1, 512), 0.5, np.float32), np.asarray(init_state["cell"])),
        "rnn_params": {k: {"b": np.asarray(v["b"]), "w": np.asarray(v["w"])}
                       for k, v in sorted(official_theta["rnn_params"].items())},
    }
    path = tmp_path / "params"
    path.write_bytes(flax.serialization.to_bytes(tree))
    loaded = load_velo_theta(path)
    np.testing.assert_array_equal(loaded["lstm_init_state"]["hidden"], 0.5)
    np.testing.assert_array_equal(loaded["rnn_params"]["rnn/linear"]["w"],
                                  official_theta["rnn_params"]["rnn/linear"]["w"])
    assert list(loaded["ff_mod_stack"]["~"])[:3] == ["w0__0", "w0__1", "w0__2"]  # back in creation order


def test_wrong_files_are_refused(small_theta, tmp_path):
    celo2_file = tmp_path / "theta.state"
    save_theta(celo2_file, {k: np.full(shape, 0.1, np.float32) for k, shape in THETA_SHAPES.items()})
    with pytest.raises(ValueError, match="Celo2 / Celo v1 theta"):
        load_velo_theta(celo2_file)
    buf = velo_theta_to_bytes(small_theta)
    with pytest.raises(ValueError, match="not a valid msgpack VeLO parameter file"):
        velo_theta_from_bytes(buf[:-100], **SMALL)  # truncated
    with pytest.raises(ValueError, match=r"lstm_init_state/hidden has shape \(1, 16\), expected \(1, 512\)"):
        velo_theta_from_bytes(buf)  # a different configuration than asked for
    bad = jax.tree.map(np.asarray, small_theta)
    bad["rnn_params"]["linear"]["w"] = np.zeros((28, 16), np.float32)  # 28 inputs: a var_rms of width 1
    with pytest.raises(ValueError, match=r"rnn_params/linear/w has shape \(28, 16\), expected \(30, 16\)"):
        velo_theta_from_bytes(flax.serialization.to_bytes(bad), **SMALL)
    del bad["rnn_params"]["step_size"]
    with pytest.raises(ValueError, match=r"missing keys \['step_size'\]"):
        velo_theta_from_bytes(flax.serialization.to_bytes(bad), **SMALL)
    with pytest.raises(ValueError, match="dtype 'float64'"):
        velo_theta_from_bytes(flax.serialization.to_bytes(jax.tree.map(lambda x: np.asarray(x, np.float64),
                                                                       small_theta)), **SMALL)
    with pytest.raises(ValueError, match="expected"):
        scale_by_velo(small_theta, 10)  # theta of one configuration, transformation of another


# --- agreement with a literal transcription of hyper_v2.py -----------------------------------------------


def reference_steps(theta, params, grads_seq, losses, num_steps, ff_mult=100.0):
    """A float64 numpy transcription of HyperV2's opt_fn (init, update), BufferLossAccumulators,
    lstm_features_for_tensor, _rnn_forward with hk.LSTM, and _ff_mod: per leaf, unchunked, blocks separate."""
    th = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
    names = sorted(params)  # jax's leaf order of a dict
    p = {k: np.asarray(params[k], np.float64) for k in names}
    mom_d, rms_d, fac_d = np.array([0.9, 0.99, 0.999]), np.array([0.999]), np.array([0.9, 0.99, 0.999])
    m = {k: np.zeros(p[k].shape + (3,)) for k in names}
    rms = {k: np.zeros(p[k].shape + (1,)) for k in names}
    fac = {}
    for k in names:
        dims = factored_dims(p[k].shape)
        if dims is None:
            fac[k] = [None, None, np.zeros(p[k].shape + (3,))]
        else:
            d1, d0 = dims
            fac[k] = [np.zeros(np.delete(p[k].shape, d0).tolist() + [3]),
                      np.zeros(np.delete(p[k].shape, d1).tolist() + [3]), None]
    decays = np.exp(-1.0 / np.logspace(1, np.log10(num_steps), 10))
    means, running_min, it = np.zeros(10), 999999999999.0 * np.ones(10), 0
    h = np.tile(th["lstm_init_state"]["hidden"], (len(names), 1))
    c = np.tile(th["lstm_init_state"]["cell"], (len(names), 1))
    clip_log = lambda v: np.clip(np.log(1e-8 + np.abs(v * 10.0)), -5, 5) * 0.5
    relu = lambda x: np.maximum(x, 0)
    sig = lambda x: 1 / (1 + np.exp(-x))
    lin = lambda name, x: x @ th["rnn_params"][name]["w"] + th["rnn_params"][name]["b"]
    out = []
    for grads, loss in zip(grads_seq, losses):
        cor = means / (1 - decays ** (it + 1))
        loss = min(abs(loss if it == 0 else cor.max()) * 2, loss)
        means = means * decays + loss * (1 - decays)
        running_min = np.minimum(running_min, means / (1 - decays ** (it + 1)))
        cor = means / (1 - decays ** (it + 1))
        lf = np.clip((cor[:-1] - running_min[:-1]) / np.maximum(1e-8, cor[1:] - running_min[:-1]) - 1, -1, 1)
        lf = lf * 0 if it + 1 <= 2 else lf
        g = {k: np.clip(np.asarray(grads[k], np.float64), -1000, 1000) for k in names}
        frac = np.tanh((it / num_steps - np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1])) * 10)
        feats = []
        for k in names:
            nm = 1 / np.sqrt(max(1e-9, np.mean(p[k] ** 2)))
            mm, rr = m[k] * nm, rms[k] * nm
            ax = tuple(range(p[k].ndim))
            mean_m = np.mean(mm, axis=ax, keepdims=True)
            rank = np.eye(5)[int(np.sum(np.asarray(p[k].shape) > 1))]
            feats.append(np.concatenate([frac, lf, clip_log(np.mean(rr, axis=ax).reshape(1)), rank,
                                         clip_log(np.mean((mm - mean_m) ** 2, axis=ax)),
                                         clip_log(np.mean((rr - mean_m) ** 2, axis=ax))]))
        x = np.stack(feats)
        x = lin("linear_2", x) + relu(lin("linear_1", x)).max(0, keepdims=True)
        gi, gg, gf, go = np.split(lin("rnn/linear", np.concatenate([x, h], -1)), 4, -1)
        c = sig(gf + 1) * c + sig(gi) * np.tanh(gg)
        h = sig(go) * np.tanh(c)
        controls, lr_mult = lin("rnn_to_controls", h), lin("step_size", h)[:, 0]
        steps = {}
        for t, k in enumerate(names):
            m[k] = mom_d * m[k] + (1 - mom_d) * g[k][..., None]
            rms[k] = rms_d * rms[k] + (1 - rms_d) * g[k][..., None] ** 2
            gsq = g[k][..., None] ** 2 + 1e-30
            dims = factored_dims(p[k].shape)
            if dims is None:
                fac[k][2] = fac_d * fac[k][2] + (1 - fac_d) * gsq
                fac_g = g[k][..., None] / np.sqrt(np.maximum(fac[k][2] + 1e-9, 1e-9))
            else:
                d1, d0 = dims
                fac[k][0] = fac_d * fac[k][0] + (1 - fac_d) * np.mean(gsq, axis=d0)
                fac[k][1] = fac_d * fac[k][1] + (1 - fac_d) * np.mean(gsq, axis=d1)
                rd1 = d1 - 1 if d1 > d0 else d1
                row_f = 1 / np.sqrt(np.maximum(fac[k][0] / (np.mean(fac[k][0], rd1, keepdims=True) + 1e-9), 1e-9))
                col_f = 1 / np.sqrt(np.maximum(fac[k][1], 1e-9))
                fac_g = g[k][..., None] * np.expand_dims(row_f, d0) * np.expand_dims(col_f, d1)
            pp, gk, mk, rk, v = p[k], g[k], m[k], rms[k], fac[k][2]
            if pp.ndim == 0:  # _ff_mod reshapes scalars to (1,)
                pp, gk, mk, rk, fac_g, v = (a[None] for a in (pp, gk, mk, rk, fac_g, v))
            rs = 1 / np.sqrt(rk + 1e-6)
            inps = [gk[..., None], np.clip(gk, -0.1, 0.1)[..., None], pp[..., None], mk, rk, mk * rs, rs, fac_g,
                    gk[..., None] * rs]
            if dims is None:
                inps += [v, v, 1 / np.sqrt(v + 1e-8), 1 / np.sqrt(v + 1e-8), mk * v ** -0.5]
            else:
                row = np.broadcast_to(np.expand_dims(fac[k][0], d0), pp.shape + (3,))
                col = np.broadcast_to(np.expand_dims(fac[k][1], d1), pp.shape + (3,))
                inps += [row, col, 1 / np.sqrt(row + 1e-8), 1 / np.sqrt(col + 1e-8),
                         mk * np.expand_dims(row_f, d0) * np.expand_dims(col_f, d1)]
            ax = tuple(range(pp.ndim))
            inps = [i / np.sqrt(1e-5 + np.mean(i ** 2, axis=ax, keepdims=True)) for i in inps]
            ff = {n: ff_mult * np.mean(w * controls[t].reshape((-1,) + (1,) * (w.ndim - 1)), axis=0)
                  for n, w in th["ff_mod_stack"]["~"].items()}
            o = relu(sum(i @ ff[f"w0__{j}"] for j, i in enumerate(inps)) + ff["b0"])
            o = relu(o @ ff["w1"] + ff["b1"]) @ ff["w2"] + ff["b2"]
            scale = np.sqrt(np.mean(pp ** 2) + 1e-9)
            step = o[..., 0] * (scale * np.exp(o[..., 1] * 0.001)) * 0.001 * lr_mult[t]
            steps[k] = -step.reshape(p[k].shape)
        out.append(steps)
        it += 1
    return out, h, means


@pytest.mark.parametrize("chunked", [False, True])
def test_matches_literal_transcription(small_theta, small_rule, chunked):
    params, grads = problem(SHAPES, steps=len(LOSSES))
    if chunked:  # "w" in 8 blocks of one row, "t" in 2 blocks of one slice, "b" in 2 blocks of 8
        steps, state = run(scale_by_velo(small_theta, 50, chunk_elems=8, **SMALL), params, grads, LOSSES)
    else:
        steps, state = run(small_rule[0], params, grads, LOSSES, small_rule[1])
    ref, ref_h, ref_means = reference_steps(small_theta, params, grads, LOSSES, 50)
    for t, (got, want) in enumerate(zip(steps, ref)):  # loss features act from step 3 on
        for k in SHAPES:
            assert got[k].shape == want[k].shape and got[k].dtype == jnp.float32
            np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-5 * np.abs(want[k]).max(),
                                       err_msg=f"step {t + 1}, leaf {k}")
    np.testing.assert_allclose(state.lstm_hidden, ref_h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.loss_means, ref_means, rtol=1e-6)


# --- the optax contract ------------------------------------------------------------------------------


def test_deterministic_finite_and_state_keeps_shapes(official_theta):
    params, grads = problem(SHAPES, seed=1)
    tx = scale_by_velo(official_theta, 100)
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    (steps_a, state_a), (steps_b, state_b) = (run(tx, params, grads, LOSSES, update) for _ in range(2))
    jax.tree.map(np.testing.assert_array_equal, (steps_a, state_a), (steps_b, state_b))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((steps_a, state_a)))
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert spec(state_a) == spec(state0)
    assert spec(steps_a[-1]) == spec(params)
    assert state0.lstm_hidden.shape == (4, 512) and int(state_a.iteration) == 3 and int(state_a.num_steps) == 100
    for field in ("m", "rms", "v_row", "v_col", "v_diag"):  # same tree as params (sharding derivation)
        assert jax.tree.structure(getattr(state0, field)) == jax.tree.structure(params)
    assert state0.m["w"].shape == (8, 12, 3) and state0.rms["w"].shape == (8, 12, 1)
    assert state0.v_row["w"].shape == (8, 3) and state0.v_col["w"].shape == (12, 3)
    assert state0.v_row["t"].shape == (2, 4, 3) and state0.v_col["t"].shape == (2, 8, 3)  # d1 = 2, d0 = 1
    assert state0.v_diag["b"].shape == (16, 3) and state0.m["s"].shape == (3,) and state0.v_diag["s"].shape == (3,)


def test_num_steps_sets_the_training_fraction(small_theta, small_rule):
    params, grads = problem(SHAPES, seed=2, steps=2)
    update = small_rule[1]  # the update reads num_steps from the state that init wrote it to
    outs = {n: run(scale_by_velo(small_theta, n, **SMALL), params, grads, LOSSES, update)[0] for n in (10, 10_000)}
    np.testing.assert_array_equal(outs[10][0]["w"], outs[10_000][0]["w"])  # step 1: t / num_steps = 0 for both
    assert not np.allclose(outs[10][1]["w"], outs[10_000][1]["w"], rtol=1e-3)  # step 2: 1/10 vs 1/10000
    fraction = velo_lib._fraction_features(jnp.int32(3), jnp.int32(10))
    np.testing.assert_allclose(fraction, np.tanh(10 * (0.3 - np.array(velo_lib.FRACTION_TIMESCALES))), rtol=1e-6)


def test_loss_enters_through_extra_args(small_theta):
    params, grads = problem(SHAPES, seed=3, steps=3)
    tx = optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(1.0),
                                                   scale_by_velo(small_theta, 50, **SMALL)))
    state = tx.init(params)
    with pytest.raises(ValueError, match="training loss"):
        tx.update(grads[0], state, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads[0], state, loss=1.0)
    with pytest.raises(ValueError, match="scalar loss"):
        tx.update(grads[0], state, params, loss=jnp.ones(2))
    update = jax.jit(tx.update)
    falling, _ = run(tx, params, grads, [4.0, 3.0, 2.0, 1.0], update)
    flat, _ = run(tx, params, grads, [4.0, 4.0, 4.0, 4.0], update)
    for t in range(2):  # loss features are zero until 3 losses are seen: they act from the 3rd update on
        jax.tree.map(np.testing.assert_array_equal, falling[t], flat[t])
    assert not np.allclose(falling[2]["w"], flat[2]["w"], rtol=1e-3)


def test_sharded_equals_unsharded(small_theta, small_rule):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    specs = {"w": P("fsdp", "tensor"), "t": P("data", "fsdp", "tensor"), "b": P("tensor"), "s": P()}
    params, grads = problem(SHAPES, seed=5, steps=2)
    tx = scale_by_velo(small_theta, 50, chunk_elems=24, **SMALL)  # "w" runs in 4 strided blocks of rows
    put = lambda tree, sh: jax.tree.map(jax.device_put, tree, sh)
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    abstract_state = jax.eval_shape(tx.init, params)
    s_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(abstract_state, params, specs, mesh),
                        is_leaf=lambda x: isinstance(x, P))
    assert s_sh.m["w"].spec == P("fsdp", "tensor", None) and s_sh.v_col["w"].spec == P("tensor", None)
    state = jax.jit(tx.init, out_shardings=s_sh)(put(params, p_sh))
    update = jax.jit(tx.update, out_shardings=(p_sh, s_sh))
    ref_steps, ref_state = run(small_rule[0], params, grads, LOSSES, small_rule[1])  # single device, unchunked
    for g, loss, ref in zip(grads, LOSSES, ref_steps):
        step, state = update(put(g, p_sh), state, put(params, p_sh), loss=loss)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), step, ref)
    for arr, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(s_sh)):
        assert arr.sharding.is_equivalent_to(sharding, arr.ndim)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), state, ref_state)


# --- the harness entry -----------------------------------------------------------------------------------


def test_velo_weight_decay_and_theta_sources(small_theta, small_rule, tmp_path):
    params, grads = problem(SHAPES, seed=6, steps=len(LOSSES))
    wd = 0.1
    decayed, _ = run(velo(small_theta, 50, weight_decay=wd, **SMALL), params, grads, LOSSES)
    l2 = sum(float(np.sum(np.asarray(p, np.float64) ** 2)) for p in params.values())
    by_hand, _ = run(small_rule[0], params, [jax.tree.map(lambda g, p: g + wd * p, g, params) for g in grads],
                     [x + wd * l2 for x in LOSSES], small_rule[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), decayed, by_hand)

    path = tmp_path / "velo.state"
    save_velo_theta(path, small_theta)
    from_file, from_dict = (velo(theta, 50, **SMALL).init(params) for theta in (str(path), small_theta))
    jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)  # includes the LSTM initial state

    shipped = registry.get("velo").weights.shipped  # what an empty optimizer.velo.theta resolves to
    jax.tree.map(np.testing.assert_array_equal, velo(shipped, 100).init(params),
                 velo(registry.get("velo").weights.load(shipped), 100).init(params))
    with pytest.raises(ValueError, match="theta is required.*weights.shipped"):
        velo(None, 100)
    with pytest.raises(ValueError, match="num_steps"):
        velo(small_theta, 0, **SMALL)


def test_shipped_weights_train_the_cpu_preset(tmp_path, shakespeare):
    """The project's meta-trained VeLO (the default weights) on the cpu-tiny GPT over real Shakespeare, with
    the optimizer config's defaults except lr = 1 (VeLO as published: lr multiplies VeLO's own step)."""
    from tests.helpers import tiny_config
    from train.loop import train

    cfg = tiny_config(tmp_path / "run", shakespeare, steps=40, log_every=1, eval_every=40, checkpoint_every=40)
    cfg.optimizer.update(name="velo", lr=1.0)
    cfg.optimizer = registry.resolve_defaults(cfg.optimizer)  # theta "": the shipped weights
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = np.array([r["loss"] for r in rows if "loss" in r])
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:5].mean() - LM_LOSS_DROP, losses
