"""``profile_steps``: a jax.profiler trace of the chosen steps, written where TensorBoard and Perfetto read it."""
import glob
import os

import pytest

from tests.helpers import tiny_config
from train.config import load_config
from train.loop import train


def _traces(workdir, process=0):
    return glob.glob(os.path.join(workdir, "profile", f"process_{process}", "plugins", "profile", "*",
                                  "*.xplane.pb"))


def test_the_chosen_steps_are_traced_and_name_the_train_step(tmp_path, shakespeare):
    cfg = tiny_config(tmp_path / "run", shakespeare, steps=4, log_every=1, eval_every=4, checkpoint_every=4,
                      profile_steps="2,3", seq_len=64)
    cfg.optimizer.warmup_steps = 1
    train(cfg)
    (trace,) = _traces(tmp_path / "run")
    assert os.path.getsize(trace) > 0 and b"jit_train_step" in open(trace, "rb").read()


def test_a_run_resumed_past_the_window_takes_no_partial_trace(tmp_path, shakespeare):
    cfg = tiny_config(tmp_path / "run", shakespeare, steps=4, log_every=1, eval_every=4, checkpoint_every=2,
                      seq_len=64)
    cfg.optimizer.warmup_steps = 1
    train(cfg, stop_at=2)
    cfg.profile_steps = "1,2"
    train(cfg)
    assert not _traces(tmp_path / "run")


@pytest.mark.parametrize("value,message", [
    ("3,2", r"must satisfy 1 <= START <= END <= steps=4"), ("0,1", "must satisfy"), ("2,9", "steps=4"),
    ("x", "must be START,END"),
])
def test_bad_windows_are_refused_when_the_config_is_loaded(value, message, tmp_path):
    cfg = tiny_config(tmp_path / "run", tmp_path / "data", steps=4, profile_steps=value)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)
