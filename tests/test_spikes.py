"""Loss spikes: a step whose loss exceeds loss_spike.factor x the running median keeps its params and optimizer
state, the data moves on, a resumed run skips exactly the same steps, and a run that keeps spiking stops."""
import json

import pytest

from tests.test_checkpoint import compilation_cache, data_dir, make_config  # noqa: F401
from train.loop import train
from train.spikes import LossSpikes


def _rows(workdir):
    rows = {}
    for line in open(workdir / "metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = (r["loss"], r["skipped"], r["skipped_steps"])
    return rows


def _config(workdir, data_dir, **spike):
    cfg = make_config(workdir, data_dir, steps=14, checkpoint_every=7)
    cfg.loss_spike.update(spike)
    return cfg


def test_skipped_steps_are_exact_across_a_resume(data_dir, tmp_path):  # noqa: F811
    spike = dict(factor=0.93, window=3, max_skips=14)  # above 0.93 x the median of the last 3: the last steps
    train(_config(tmp_path / "whole", data_dir, **spike))
    whole = _rows(tmp_path / "whole")
    cfg = _config(tmp_path / "resumed", data_dir, **spike)
    train(cfg, stop_at=7)
    train(cfg)
    assert _rows(tmp_path / "resumed") == whole
    skipped = [s for s, (_, skip, _) in whole.items() if skip]
    assert 0 < len(skipped) < 11 and min(skipped) >= 5  # no threshold before 3 losses of steps <= s - 2
    assert whole[14][2] == len(skipped)


def test_a_run_that_keeps_spiking_stops_naming_the_fix(data_dir, tmp_path):  # noqa: F811
    cfg = _config(tmp_path / "run", data_dir, factor=0.5, window=2, max_skips=3)  # every step is a "spike"
    with pytest.raises(LossSpikes, match=r"3 steps in a row up to step 6 had a loss above loss_spike.factor=0.5"):
        train(cfg)
    rows = _rows(tmp_path / "run")
    assert [rows[s][1] for s in sorted(rows)] == [0, 0, 0, 1, 1, 1]
