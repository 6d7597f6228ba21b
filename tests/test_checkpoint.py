"""Checkpoint/resume: exact resume, resume on another mesh, preemption, corrupt and incompatible
checkpoints, init_from, sampling. Small runs of the cpu-tiny model on a generated corpus.

Runs go through ``train.loop.train`` in this process (8 simulated CPU devices, see conftest) where they
can, and through ``python -m train`` subprocesses where a real process is needed (signals, kill -9).
"""
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data
from configs.cpu_tiny import get_config
from optim.registry import REGISTRY
from tests.helpers import optimizer_config
from infra.checkpoint import CheckpointError, Checkpointer, fingerprint
from train.loop import train
from infra.metrics import read_metrics

OPTIMIZERS = sorted(REGISTRY)
# The loop tests run for AdamW by default and for every other optimizer with -m slow; the fast
# test_optimizer_state_roundtrip covers every optimizer's state in the default run.
LOOP_OPTIMIZERS = [pytest.param(n, marks=() if n == "adamw" else pytest.mark.slow) for n in OPTIMIZERS]
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
WORDS = ("the king queen lord lady good night day love death sword crown heart blood fair sweet speak come go "
         "stay hear know think see tell give take make let thou thee thy my our your and but not what why when "
         "where how now then here there this that with from upon noble gentle honest poor brave true").split()


def make_corpus(root: pathlib.Path, n_docs: int = 8, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))).capitalize() + "."
                 for _ in range(int(rng.integers(30, 60)))]
        (root / f"doc_{d}.txt").write_text(f"ACT {d}.\n" + "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs: each ``train`` call builds fresh jitted
    closures, so identical programs would otherwise be compiled again for every run."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(keys[1], 0)
    jax.config.update(keys[2], 0)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ckpt_data")
    corpus = make_corpus(root / "texts")
    info = data.ensure_prepared(root / "data", corpus=corpus, vocab_size=400, shard_mb=0.002, verbose=False)
    assert len(info.files("train")) > 1  # resume tests run on a multi-shard dataset
    return info.data_dir


def make_config(workdir, data_dir, optimizer="adamw", **overrides):
    c = get_config()
    c.workdir = str(workdir)
    c.data.dir, c.data.vocab_size, c.data.num_threads = str(data_dir), 400, 1
    c.data.corpus = data.load_info(data_dir).corpus
    c.seq_len, c.batch_size, c.steps = 32, 8, STEPS
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 1000, 1, 3
    c.optimizer = optimizer_config(optimizer)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def cli_args(cfg) -> list[str]:
    """``python -m train`` arguments that reproduce ``cfg`` (the fields the tests set)."""
    args = ["--config", str(ROOT / "configs" / "cpu_tiny.py")]
    flat = {"workdir": cfg.workdir, "data.dir": cfg.data.dir, "data.corpus": cfg.data.corpus,
            "data.vocab_size": cfg.data.vocab_size, "data.num_threads": cfg.data.num_threads,
            "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "steps": cfg.steps, "log_every": cfg.log_every,
            "eval_every": cfg.eval_every, "eval_batches": cfg.eval_batches,
            "checkpoint_every": cfg.checkpoint_every, "mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp,
            "mesh.tensor": cfg.mesh.tensor}
    flat.update(_flat(cfg.optimizer, "optimizer."))
    return args + [f"--config.{k}={v}" for k, v in flat.items()]


def _flat(node, prefix: str) -> dict:
    """The leaves of a config section (its per-optimizer sections too) as dotted flag names."""
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out


# One uninterrupted run and one run stopped (like a preemption) at STEPS // 2, per optimizer.
_runs = {}


def reference(name, data_dir, tmp_path_factory):
    if ("ref", name) not in _runs:
        wd = tmp_path_factory.mktemp(f"ref_{name}")
        train(make_config(wd, data_dir, name))
        _runs["ref", name] = wd
    return _runs["ref", name]


def interrupted(name, data_dir, tmp_path_factory):
    if ("half", name) not in _runs:
        wd = tmp_path_factory.mktemp(f"half_{name}")
        summary = train(make_config(wd, data_dir, name), stop_at=STEPS // 2)
        assert summary["stopped_early"] and summary["step"] == STEPS // 2
        _runs["half", name] = wd
    return _runs["half", name]


def copy_run(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst)
    return pathlib.Path(dst)


# ------------------------------------------------------------------------------------------ (1) exact resume

@pytest.mark.parametrize("name", LOOP_OPTIMIZERS)
def test_resume_is_bit_identical(name, data_dir, tmp_path_factory, tmp_path):
    ref = losses(reference(name, data_dir, tmp_path_factory))
    wd = copy_run(interrupted(name, data_dir, tmp_path_factory), tmp_path / "run")
    assert sorted(Checkpointer(wd / "checkpoints").steps()) == [STEPS // 2]
    saved_data = json.loads((wd / "checkpoints" / str(STEPS // 2) / "data" / "process_0-of-1.json").read_text())
    assert saved_data == {"next_index": STEPS // 2}  # grain's iterator state: the next batch is step 3's
    summary = train(make_config(wd, data_dir, name))
    assert summary["step"] == STEPS and not summary["stopped_early"]
    got = losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    # bit-identical: the same compiled program on the same mesh, state restored exactly
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_resume_after_kill_9(data_dir, tmp_path_factory, tmp_path):
    """A real process killed with SIGKILL after its first checkpoint; the rerun matches exactly."""
    ref = losses(reference("adamw", data_dir, tmp_path_factory))
    cfg = make_config(tmp_path / "run", data_dir, steps=STEPS, checkpoint_every=2)
    proc = subprocess.Popen([sys.executable, "-m", "train", *cli_args(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoints" / "2"
    deadline = time.time() + 240
    while not (ckpt / "commit_success.txt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt / "commit_success.txt").exists()
    train(cfg)
    got = losses(tmp_path / "run")
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]


# ------------------------------------------------------------------------------------ (2) another mesh

def _random_array(abstract, rng=np.random.default_rng(0)):
    kind = np.dtype(abstract.dtype).kind
    if kind == "f":
        value = rng.normal(size=abstract.shape)
    elif kind in "iub":
        value = rng.integers(0, 2 if kind == "b" else 100, size=abstract.shape)
    else:
        raise NotImplementedError(f"random values of {abstract.dtype}")
    return jax.device_put(value.astype(abstract.dtype), abstract.sharding)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_roundtrip(name, tmp_path):
    """Every optimizer's full state survives save on 2x2x2 -> restore on data=8 and on one device, exactly."""
    from tests.helpers import tiny_run

    layout = tiny_run(optimizer_config(name), (2, 2, 2), steps=10).layout
    state = jax.tree.map(_random_array, layout.abstract)  # the state's exact tree, random values
    ck = Checkpointer(tmp_path / "ck")
    ck.save(5, state)
    ck.close()
    expected = jax.tree.map(np.asarray, state)
    for mesh in ((8, 1, 1), (1, 1, 1)):
        other = tiny_run(optimizer_config(name), mesh, steps=10).layout
        step, restored = Checkpointer(tmp_path / "ck").restore_latest(other.abstract)
        assert step == 5
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)
        for arr, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(other.shardings)):
            assert arr.sharding.is_equivalent_to(sharding, arr.ndim)


@pytest.mark.parametrize("name", LOOP_OPTIMIZERS)
@pytest.mark.parametrize("mesh", ["data8", "single"])
def test_resume_on_another_mesh(name, mesh, data_dir, tmp_path_factory, tmp_path):
    ref = losses(reference(name, data_dir, tmp_path_factory))
    wd = copy_run(interrupted(name, data_dir, tmp_path_factory), tmp_path / "run")  # saved on 2x2x2
    if mesh == "data8":
        cfg = make_config(wd, data_dir, name, **{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
        summary = train(cfg)
    else:
        cfg = make_config(wd, data_dir, name, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
        summary = train(cfg, devices=jax.devices()[:1])
    assert summary["step"] == STEPS
    got = losses(wd)
    later = range(STEPS // 2 + 1, STEPS + 1)
    np.testing.assert_allclose([got[s] for s in later], [ref[s] for s in later], rtol=1e-5)


# ------------------------------------------------------------------------------------- (3) preemption

def test_sigterm_checkpoints_the_current_step_and_exits_0(data_dir, tmp_path):
    wd = tmp_path / "run"
    cfg = make_config(wd, data_dir, steps=10_000, checkpoint_every=10_000, eval_every=10_000,
                      **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    args = [*cli_args(cfg), "--config.cpu_devices=1"]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "stopped early and checkpointed" in out
    steps = Checkpointer(wd / "checkpoints").steps()
    last = max(losses(wd))
    assert steps == [last] and 2 <= last < 100  # the step it was working on, not a scheduled checkpoint
    assert f"checkpoint of step {last} written" in out


def test_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from infra.preemption import StopRequest\n"
            "with StopRequest() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert stop.requested and stop.signal_name == 'SIGINT'\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "second SIGTERM: exiting immediately" in proc.stderr


# ------------------------------------------------------------------------------- (4) corrupt checkpoints

def _largest_array_file(step_dir) -> str:
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    return max(files, key=os.path.getsize)


def test_truncated_latest_checkpoint_is_skipped(data_dir, tmp_path_factory, tmp_path, capsys):
    ref_dir = reference("adamw", data_dir, tmp_path_factory)
    ref = losses(ref_dir)
    wd = copy_run(ref_dir, tmp_path / "run")  # checkpoints 3 and 6
    ckpts = wd / "checkpoints"
    victim = _largest_array_file(ckpts / str(STEPS))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    shutil.copytree(ckpts / "3", ckpts / "9.orbax-checkpoint-tmp")  # a save that never finished
    (wd / "metrics.jsonl").unlink()
    summary = train(make_config(wd, data_dir, steps=STEPS))
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / str(STEPS)} could not be restored" in out
    assert "9.orbax-checkpoint-tmp: an unfinished checkpoint save" in out
    assert summary["step"] == STEPS
    got = losses(wd)
    assert sorted(got) == [4, 5, 6]  # resumed from step 3
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    # nothing was deleted: the bad checkpoint and the unfinished save were renamed
    assert len(glob.glob(str(ckpts / f"{STEPS}.unusable-*"))) == 1
    assert len(glob.glob(str(ckpts / "9.unfinished-*"))) == 1
    assert Checkpointer(ckpts).steps() == [3, 6]


def _small_state():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    rng = np.random.default_rng(0)
    return {"w": jax.device_put(rng.normal(size=(256, 512)).astype(np.float32), sh),
            "v": jax.device_put(rng.normal(size=(128, 64)).astype(np.float32), sh),
            "n": jax.device_put(np.int32(7), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "flip_bit", "delete"])
def test_damaged_array_files_are_detected(damage, tmp_path, capsys):
    """Orbax reads some damaged chunks silently (bytes overwritten in place, a flipped bit): the saved
    fingerprint catches them; the damaged checkpoint is skipped for the previous one."""
    state = _small_state()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ck = Checkpointer(tmp_path / "ck", keep=5)
    ck.save(1, jax.tree.map(lambda x: x * 0 + 1 if x.ndim else x, state))
    ck.save(2, state)
    ck.close()
    victim = _largest_array_file(tmp_path / "ck" / "2")
    size = os.path.getsize(victim)
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "delete":
        os.remove(victim)
    else:
        with open(victim, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)[0]
            f.seek(size // 2)
            f.write(bytes([byte ^ 0x04]) if damage == "flip_bit" else b"\xff" * 16)
    ck = Checkpointer(tmp_path / "ck", keep=5)
    step, restored = ck.restore_latest(abstract)
    assert step == 1 and int(restored["n"]) == 7
    assert f"checkpoint {tmp_path / 'ck' / '2'} could not be restored" in capsys.readouterr().out
    assert fingerprint(restored) != fingerprint(state)


def test_retention_keeps_the_last_n_and_every_kth(tmp_path):
    state = _small_state()
    ck = Checkpointer(tmp_path / "ck", keep=2, keep_every=4)
    for step in range(1, 11):
        ck.save(step, state)
    ck.close()
    assert Checkpointer(tmp_path / "ck").steps() == [4, 8, 9, 10]


def test_fingerprint_does_not_depend_on_the_sharding():
    state = _small_state()
    single = jax.device_put(state, jax.devices()[0])
    assert fingerprint(state) == fingerprint(single)
    changed = dict(state, w=state["w"].at[3, 5].add(1e-7))
    assert fingerprint(changed)["w"] != fingerprint(state)["w"]
    assert fingerprint(changed)["v"] == fingerprint(state)["v"]


# --------------------------------------------------------------------- (5) incompatible state or data

@pytest.mark.parametrize("name", LOOP_OPTIMIZERS)
def test_incompatible_state_is_a_clear_error(name, data_dir, tmp_path_factory, tmp_path):
    wd = copy_run(interrupted(name, data_dir, tmp_path_factory), tmp_path / "run")
    with pytest.raises(CheckpointError) as e:
        train(make_config(wd, data_dir, name, **{"model.vocab_size": 640}))
    msg = str(e.value)
    assert "Mismatched leaves" in msg and "params/token_embed: checkpoint float32[512,128], this run " \
                                        "float32[640,128]" in msg
    with pytest.raises(CheckpointError) as e:  # the optimizer state's structure changes
        train(make_config(wd, data_dir, name, **{"optimizer.clip_norm": 0.0}))
    assert "Mismatched leaves" in str(e.value) and "only in the checkpoint" in str(e.value)
    assert Checkpointer(wd / "checkpoints").steps() == [STEPS // 2]  # nothing touched


def test_changed_data_order_is_a_clear_error(data_dir, tmp_path_factory, tmp_path):
    wd = copy_run(interrupted("adamw", data_dir, tmp_path_factory), tmp_path / "run")
    for override, text in (({"batch_size": 16}, "batch_size: checkpoint 8, this run 16"),
                           ({"seed": 1}, "seed: checkpoint 0, this run 1"),
                           ({"seq_len": 64}, "seq_len: checkpoint 32, this run 64")):
        with pytest.raises(CheckpointError, match="another data order") as e:
            train(make_config(wd, data_dir, **override))
        assert text in str(e.value)
    other = tmp_path / "other"
    data.ensure_prepared(other / "data", corpus=make_corpus(other / "texts", seed=1), vocab_size=400,
                         verbose=False)
    with pytest.raises(CheckpointError, match="dataset: checkpoint"):
        train(make_config(wd, data_dir=str(other / "data")))
    moved = shutil.copytree(data_dir, tmp_path / "same_data_elsewhere")  # the same data at another path is fine
    assert train(make_config(wd, str(moved)), stop_at=STEPS // 2 + 1)["step"] == STEPS // 2 + 1


# ---------------------------------------------------------------------------------------- (6) init_from

@pytest.mark.parametrize("name", LOOP_OPTIMIZERS)
def test_init_from_takes_params_only(name, data_dir, tmp_path_factory, tmp_path):
    src = reference(name, data_dir, tmp_path_factory)
    wd = tmp_path / "finetune"
    cfg = make_config(wd, data_dir, name, init_from=str(src))
    assert train(cfg, stop_at=2)["step"] == 2
    got = losses(wd)
    assert sorted(got) == [1, 2]  # a new run: it counts from step 0
    # its first loss is that of the source's final params on batch 0 (a fresh model's is ~ln(512) = 6.2)
    from infra.checkpoint import restore_params
    from train.build import build_run
    from train.config import load_config, with_dataset

    run = build_run(with_dataset(load_config(cfg), data.load_info(data_dir).vocab_size))
    step, params = restore_params(str(src), run.layout.abstract.params)
    assert step == STEPS
    batch = next(data.train_iterator(data_dir, seq_len=32, global_batch_size=8, seed=0, num_threads=1))
    with jax.set_mesh(run.mesh):
        total, count = run.eval_step(params, jax.device_put(batch, run.batch_sharding))
    np.testing.assert_allclose(got[1], float(total) / float(count), rtol=1e-5)
    # and its optimizer state is fresh: the saved step counter is the new run's
    ck = Checkpointer(wd / "checkpoints")
    assert ck.steps() == [2] and ck.meta(2)["step"] == 2


# ------------------------------------------------------------------------------------------- (7) sample

def test_sample_generates_text(data_dir, tmp_path_factory, capsys):
    from tools import sample

    src = str(reference("adamw", data_dir, tmp_path_factory))
    a = sample.sample(src, "The king", max_tokens=24, seed=0)
    assert isinstance(a, str) and len(a) > 10
    assert sample.sample(src, "The king", max_tokens=24, seed=0) == a  # same program, same seed
    assert sample.sample(src, "The king", max_tokens=24, seed=1) != a
    greedy = sample.sample(src, "The king", max_tokens=24, temperature=0.0)
    assert greedy == sample.sample(src, "The king", max_tokens=24, temperature=0.0, seed=5)
    assert greedy == sample.sample(src, "The king", max_tokens=24, temperature=0.0, cache=False)  # no KV cache
    assert sample.sample(src, "The king", max_tokens=24, seed=0, top_p=1e-6) == greedy  # only the likeliest
    capsys.readouterr()  # what training the reference run printed, when this test made it
    sample.main(["--workdir", src, "--prompt", "The queen", "--max_tokens", "12"])
    assert capsys.readouterr().out.startswith("The queen")
    (tmp_path_factory.getbasetemp() / "prompts.txt").write_text("The king\n\nA horse\n")
    sample.main(["--workdir", src, "--prompt", "The queen", "--prompts_file",
                 str(tmp_path_factory.getbasetemp() / "prompts.txt"), "--temperature", "0", "--max_tokens", "24"])
    texts = capsys.readouterr().out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(texts) == 3 and all(t.startswith(p) for t, p in zip(texts, ["The queen", "The king", "A horse"]))
    assert texts[1] == "The king" + greedy  # batched with other prompts: the same greedy tokens as alone
