"""Weights & Biases: a run's rows and config in a W&B run (offline here: nothing contacts a server), resumed
as the same W&B run."""
import glob
import json
import os
import struct

import pytest

from tests.helpers import tiny_config
from train.loop import train

pytest.importorskip("wandb", reason="the wandb extra")


def _records(path: str) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then the LevelDB
    log format, 32 KiB blocks of (crc32, length, kind) framed chunks, kind 1 whole, 2/3/4 first/middle/last."""
    from wandb.proto import wandb_internal_pb2

    buf, block, pos, out, pending = open(path, "rb").read(), 32768, 7, [], b""
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        data, pos = buf[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _history(workdir) -> tuple[dict, set]:
    """({step: loss} logged to W&B over every offline run folder of the workdir, {run ids})."""
    losses, ids = {}, set()
    for path in glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")):
        ids.add(os.path.basename(path)[len("run-"):-len(".wandb")])
        for r in _records(path):
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "loss" in row:
                    losses[row["_step"]] = row["loss"]
    return losses, ids


def test_a_run_logs_to_wandb_and_resumes_the_same_wandb_run(tmp_path, shakespeare, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, shakespeare, steps=4, log_every=1, eval_every=4, checkpoint_every=2, seq_len=64)
    cfg.optimizer.warmup_steps = 1
    cfg.wandb.update(project="celo2-harness-test", group="g")
    train(cfg, stop_at=2)
    train(cfg)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    expected = {r["step"]: r["loss"] for r in rows if "loss" in r}
    logged, ids = _history(workdir)
    assert logged == pytest.approx(expected) and sorted(logged) == [1, 2, 3, 4]
    assert ids == {(workdir / "wandb_id.txt").read_text().strip()}  # both parts: one W&B run
    (run_record,) = {r.run.run_id: r for path in glob.glob(str(workdir / "wandb" / "*" / "run-*.wandb"))
                     for r in _records(path) if r.WhichOneof("record_type") == "run"}.values()
    config = {u.key: json.loads(u.value_json) for u in run_record.run.config.update}
    assert run_record.run.run_group == "g" and config["optimizer"]["lr"] == 3e-3  # the resolved config


def test_wandb_without_the_extra_is_refused_when_the_config_is_loaded(tmp_path, monkeypatch):
    import builtins

    from train.config import load_config

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(
        ImportError("No module named 'wandb'")) if name == "wandb" else real_import(name, *a, **k))
    cfg = tiny_config(tmp_path / "run", tmp_path / "data")
    cfg.wandb.project = "p"
    with pytest.raises(ValueError, match=r'wandb.project=.p. needs the wandb extra .*pip install -e ".\[wandb\]"'):
        load_config(cfg)
