"""launch.local: several JAX processes on 127.0.0.1 forming one job (4 CPU devices each, gloo)."""
import glob
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from launch.local import launch
from tests.test_checkpoint import ROOT, cli_args, compilation_cache, data_dir, losses, make_config  # noqa: F401
from infra.checkpoint import Checkpointer
from train.loop import train


def test_launcher_prefixes_output_and_kills_the_rest_when_one_fails(tmp_path, monkeypatch):
    (tmp_path / "fake_worker.py").write_text(textwrap.dedent("""
        import os, sys, time
        pid = int(os.environ["JAX_PROCESS_ID"])
        print(f"hello from {pid} of {os.environ['JAX_NUM_PROCESSES']} at {os.environ['JAX_COORDINATOR_ADDRESS']}",
              flush=True)
        print("args:", " ".join(sys.argv[1:]), flush=True)
        if pid == 1:
            sys.exit(3)
        time.sleep(120)
    """))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = io.StringIO()
    t0 = time.time()
    code = launch(2, 4, ["--x=1"], module="fake_worker", stream=out)
    text = out.getvalue()
    assert code == 3 and time.time() - t0 < 60, text
    assert "[p0] hello from 0 of 2 at 127.0.0.1:" in text and "[p1] hello from 1 of 2" in text
    assert "[p1] args: --x=1 --config.multiprocess=True --config.cpu_devices=4" in text
    assert "process 1 failed with exit code 3; killing the others" in text


@pytest.mark.parametrize("codes,killed,expected", [
    ([0, 0], set(), 0), ([0, 3], {0}, 3), ([2, 1], set(), 1), ([2, 137], set(), 137), ([137, 2], {0}, 2),
    ([3, 1], set(), 3),
])
def test_the_job_exits_with_its_worst_code(codes, killed, expected):
    """Death by a signal is worse than a failure, which is worse than bad input; processes the launcher killed
    do not count; among equals the first."""
    from launch.local import job_exit_code

    assert job_exit_code(codes, killed) == expected


def test_two_processes_match_one_and_resume_in_one(data_dir, tmp_path):  # noqa: F811
    """2 processes x 4 devices train like 1 x 8; SIGTERM to one process stops both at the same step with a
    checkpoint; that checkpoint resumes in a single process."""
    cfg = make_config(tmp_path / "multi", data_dir, steps=200, checkpoint_every=1000, eval_every=1000)
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4", "--",
           *cli_args(cfg), "--config.profile_steps=1,2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TQDM_MININTERVAL="0"))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    metrics = pathlib.Path(cfg.workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    pid1 = next(int(line.split("pid ")[1].split(",")[0]) for line in lines if "process 1/2: pid" in line)
    os.kill(pid1, signal.SIGTERM)  # only process 1 is told to stop
    proc.wait(timeout=300)
    reader.join(10)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "[p1] SIGTERM received" in text and "[p0] stop requested by another process" in text
    (stop,) = Checkpointer(pathlib.Path(cfg.workdir) / "checkpoints").steps()
    assert 2 <= stop < 200
    assert f"[p0] stop requested by another process: checkpoint of step {stop}" in text
    assert f"[p1] SIGTERM received: checkpoint of step {stop}" in text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_rows = [r["step"] for r in rows if "loss" in r]
    assert train_rows == list(range(1, stop + 1))  # one training row per step: only process 0 writes metrics
    multi = losses(cfg.workdir)
    for process in (0, 1):  # each process traced its steps 1-2
        assert glob.glob(f"{cfg.workdir}/profile/process_{process}/plugins/profile/*/*.xplane.pb"), process

    # the 2-process checkpoint resumes in this single process (8 devices) ...
    train(cfg, stop_at=stop + 2)
    resumed = losses(cfg.workdir)
    # ... and everything equals one uninterrupted single-process run on 8 devices
    ref_cfg = make_config(tmp_path / "single", data_dir, steps=200, checkpoint_every=1000, eval_every=1000)
    train(ref_cfg, stop_at=stop + 2)
    ref = losses(ref_cfg.workdir)
    first = range(1, stop + 1)
    np.testing.assert_allclose([multi[s] for s in first], [ref[s] for s in first], rtol=1e-5)
    later = (stop + 1, stop + 2)
    np.testing.assert_allclose([resumed[s] for s in later], [ref[s] for s in later], rtol=1e-5)
