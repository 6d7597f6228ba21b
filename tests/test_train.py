"""End-to-end: the training loop on real Shakespeare text, and clear errors for configs that cannot work."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import tiny_config
from train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_tiny_trains_on_shakespeare_on_a_2x2x2_mesh(tmp_path, shakespeare):
    cfg = tiny_config(tmp_path / "run", shakespeare, steps=200, eval_every=50, log_every=10,
                      checkpoint_every=200)
    summary = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4 and all(a > b for a, b in zip(evals, evals[1:]))  # falls steadily
    assert evals[-1] < summary["unigram_entropy"] - 0.3  # well below the unigram entropy
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm"} <= set(train_rows[-1])
    assert "tokens_per_sec" in train_rows[-1] and train_rows[-1]["mfu"] > 0
    for name in ("config.json", "loss.png", "tensorboard", "checkpoints"):
        assert os.path.exists(tmp_path / "run" / name), name


@pytest.mark.parametrize("overrides,message", [
    (dict(mesh=dict(data=3, fsdp=1, tensor=1)), "needs 3 devices but 8 are available"),
    (dict(mesh=dict(data=1, fsdp=1, tensor=8)), "4 heads, not divisible by mesh.tensor=8"),
    (dict(batch_size=6), "not divisible by data\\*fsdp=4"),
    (dict(seq_len=4096), "exceeds the context"),
    (dict(steps=0), "steps=0 is out of range: it must be an integer >= 1"),
])
def test_bad_configs_fail_before_compiling(tmp_path, shakespeare, overrides, message):
    cfg = tiny_config(tmp_path / "run", shakespeare)
    for k, v in overrides.items():
        cfg[k].update(v) if isinstance(v, dict) else setattr(cfg, k, v)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "train", "--config", os.path.join(REPO, "configs", "cpu_tiny.py"),
           f"--config.data.dir={tmp_path}/missing", f"--config.data.corpus={tmp_path}/no_such_corpus",
           f"--config.workdir={tmp_path}/run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_corpus" in errors[0]
    assert "Traceback" not in proc.stderr
