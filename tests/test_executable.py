"""Compile once, run later: a train step saved by the plan is loaded by a run of the same program on the same
kind of devices (and gives the same training), and anything else makes the run compile as usual."""
import json
import os
import pickle

import pytest

import data
from tests.helpers import tiny_config
from tools.plan import compile_step
from train import executable
from train.build import build_run
from train.config import load_config, with_dataset
from train.loop import train


def _losses(workdir) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]


def _config(tmp_path, name, shakespeare, optimizer=None, mesh=None, **overrides):
    cfg = tiny_config(tmp_path / name, shakespeare, steps=6, log_every=1, eval_every=6, checkpoint_every=6,
                      **overrides)
    cfg.optimizer.update(dict(warmup_steps=2, **(optimizer or {})))
    cfg.mesh.update(mesh or {})
    return cfg


def test_a_saved_step_is_loaded_and_trains_as_the_compiled_one(tmp_path, shakespeare, capsys):
    saved = str(tmp_path / "step.jaxexe")
    cfg = _config(tmp_path, "plan", shakespeare)
    info = data.load_info(shakespeare)
    plan = compile_step(build_run(with_dataset(load_config(cfg), info.vocab_size), dataset=info), save=saved)
    assert plan["saved_step"]["bytes"] == os.path.getsize(saved) > 0
    key = pickle.load(open(saved, "rb"))["key"]
    assert key["devices"] == 8 and key["platform"] == "cpu" and key["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}

    train(_config(tmp_path, "compiled", shakespeare))
    capsys.readouterr()
    train(_config(tmp_path, "loaded", shakespeare, compiled_step=saved))
    assert f"train step loaded from {saved} (compiled for 8 cpu)" in capsys.readouterr().out
    assert _losses(tmp_path / "loaded") == _losses(tmp_path / "compiled")  # bit for bit

    # another program (a learning rate is a constant of it) or another mesh: compiled as usual, saying why
    train(_config(tmp_path, "other_lr", shakespeare, compiled_step=saved, optimizer={"lr": 2e-3}))
    out = capsys.readouterr().out
    assert "was compiled for another program or devices (optimizer.lr: file 0.003, run 0.002): compiling" in out
    train(_config(tmp_path, "other_mesh", shakespeare, compiled_step=saved, mesh={"data": 8, "fsdp": 1, "tensor": 1}))
    assert "mesh.data: file 2, run 8; mesh.fsdp: file 2, run 1; mesh.tensor: file 2, run 1" in capsys.readouterr().out


@pytest.mark.parametrize("content,reason", [(None, "does not exist"), (b"not a pickle", "is unreadable"),
                                             (pickle.dumps({"format": 0}), "is unreadable (not a saved train step")])
def test_a_missing_or_corrupt_file_compiles_the_step(tmp_path, shakespeare, content, reason):
    path = tmp_path / "step.jaxexe"
    if content is not None:
        path.write_bytes(content)
    info = data.load_info(shakespeare)
    cfg = with_dataset(load_config(_config(tmp_path, "run", shakespeare, compiled_step=str(path))), info.vocab_size)
    run = build_run(cfg, dataset=info)
    step, note = run.step_to_call
    assert step is run.train_step and f"compiled_step {path} {reason}" in note and note.endswith("compiling the train step")


def test_the_key_holds_the_weight_files_digest(tmp_path, shakespeare):
    info = data.load_info(shakespeare)
    cfg = with_dataset(load_config(_config(tmp_path, "run", shakespeare, optimizer={"name": "celo2"})),
                       info.vocab_size)
    key = executable.program_key(build_run(cfg, dataset=info))
    assert len(key["optimizer"]["celo2"]["theta_sha256"]) == 64
    assert executable.differences(key, {**key, "seed": 1}) == ["seed: file 0, run 1"]
