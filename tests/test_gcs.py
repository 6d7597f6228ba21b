"""Workdirs on object storage (gs://) against a real GCS API server: the gcp-storage-emulator package started
by the fixture (in memory, with GCS's generation preconditions added: see tests/gcs_emulator.py and
tests/gcs_bucket.py).

Orbax/tensorstore reach it through ``TENSORSTORE_GCS_HTTP_URL`` (+ ``GOOGLE_AUTH_TOKEN_FOR_TESTING``), the file
layer (etils.epath -> gcsfs) and the google-cloud-storage client (lease, TensorBoard) through
``STORAGE_EMULATOR_HOST``. Training runs in ``python -m train`` subprocesses (kill -9) and in this process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.gcs_bucket import blob as _blob, gcs, names as _names  # noqa: F401  (skips without the gs:// libraries)
from infra.files import is_uri, join, resolve  # noqa: E402
from infra.lease import LEASE, GcsWorkdirLease, LeaseError, WorkdirLease  # noqa: E402
from tests.test_checkpoint import (ROOT, STEPS, cli_args, compilation_cache, data_dir, losses,  # noqa: E402,F401
                                   make_config, reference)
from train.loop import train  # noqa: E402


def test_uris_stay_uris(data_dir):
    from train.config import load_config

    assert is_uri("gs://b/run") and not is_uri("runs/x") and not is_uri("/abs/gs:/b")
    assert resolve("gs://b/run/") == "gs://b/run" and resolve("runs/x") == os.path.abspath("runs/x")
    assert join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    cfg = make_config("gs://b/runs/x", data_dir)
    assert load_config(cfg).workdir == "gs://b/runs/x"  # not <cwd>/gs:/b/runs/x


def test_gs_workdir_kill_9_and_resume(gcs, data_dir, tmp_path_factory, capsys):
    """A run on gs:// killed with SIGKILL after its first checkpoint, resumed in this process: the losses
    are bit-identical to an uninterrupted local run, and every output is in the bucket."""
    ref = losses(reference("adamw", data_dir, tmp_path_factory))
    wd = f"{gcs}/run"
    cfg = make_config(wd, data_dir, steps=STEPS, checkpoint_every=2)
    proc = subprocess.Popen([sys.executable, "-m", "train", *cli_args(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marker = _blob(f"{wd}/checkpoints/2/commit_success.txt")
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert marker.exists() and proc.returncode == -signal.SIGKILL, out[-3000:]
    assert LEASE in _names(wd)  # the killed run's lease, left behind

    capsys.readouterr()
    summary = train(cfg)  # takes over the dead run's lease, resumes from the newest finished checkpoint
    out = capsys.readouterr().out
    assert "taking over the lease" in out and "no longer runs on this host" in out, out
    assert "resumed at step" in out, out
    assert summary["step"] == STEPS and summary["checkpoint"] == f"{wd}/checkpoints/{STEPS}"
    got = losses(wd)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    names = _names(wd)
    assert {"config.json", "metrics.jsonl", "loss.png"} <= set(names), names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), names
    assert f"checkpoints/{STEPS}/commit_success.txt" in names and LEASE not in names
    assert json.loads(_blob(f"{wd}/config.json").download_as_bytes())["workdir"] == wd


def test_unfinished_gs_save_is_set_aside(gcs, capsys):
    """On object storage orbax marks a finished save with commit_success.txt; a step without it (a kill
    mid-save) is moved out of orbax's way, as the .orbax-checkpoint-tmp directories are on a local disk."""
    import jax.numpy as jnp

    from infra.checkpoint import Checkpointer

    ckpts = f"{gcs}/unfinished/checkpoints"
    _blob(f"{ckpts}/4/state/manifest.ocdbt").upload_from_string(b"partial")
    ck = Checkpointer(ckpts)
    assert ck.incomplete() == [f"{ckpts}/4"] and ck.steps() == []
    assert ck.restore_latest({}) == (None, None)
    ck.save(4, {"w": jnp.arange(8.0)})  # orbax writes step 4 again, into a place it sees empty
    ck.close()
    assert ck.steps() == [4] and ck.incomplete() == []
    moved = [n for n in _names(ckpts) if n.startswith("4.unfinished-")]
    assert len(moved) == 1 and moved[0].endswith("/state/manifest.ocdbt") and "ignoring" in capsys.readouterr().out


def test_second_run_on_a_gs_workdir_is_refused(gcs, data_dir):
    wd = f"{gcs}/busy"
    with WorkdirLease(wd) as held:
        assert isinstance(held, GcsWorkdirLease)
        with pytest.raises(LeaseError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
            train(make_config(wd, data_dir))
        assert _names(wd) == [LEASE]  # nothing else written
    assert _names(wd) == []  # released


def test_stale_gs_lease_is_taken_over_by_exactly_one(gcs, capsys):
    wd = f"{gcs}/stale"
    old = {"holder": "dead", "host": "elsewhere", "pid": 1, "started": time.time() - 3600,
           "heartbeat": time.time() - 3600}
    _blob(f"{wd}/{LEASE}").upload_from_string(json.dumps(old))
    a, b = WorkdirLease(wd, stale_after_s=60), WorkdirLease(wd, stale_after_s=60)
    for lease in (a, b):  # both find it stale...
        lease._prepare()
        assert lease._stale(lease._read())
    assert a._take_over(old, "test") and not b._take_over(old, "test")  # ...the generation lets one win
    assert "taking over the lease" in capsys.readouterr().out
    assert json.loads(_blob(f"{wd}/{LEASE}").download_as_bytes())["holder"] == a.record["holder"]
    assert a._heartbeat()
    c = WorkdirLease(wd, stale_after_s=0.0)  # a heartbeat older than 0 s: stale at once
    c.acquire()
    assert not a._heartbeat()  # a notices that its lease was taken
    assert "was taken by another run" in capsys.readouterr().out
    a._delete()  # must not delete c's lease
    assert json.loads(_blob(f"{wd}/{LEASE}").download_as_bytes())["holder"] == c.record["holder"]
    c.release()
    assert _names(wd) == []


def test_a_second_trainer_on_a_gs_workdir_stops_naming_the_first(gcs, data_dir):
    """Two ``python -m train`` processes on one gs:// workdir: the second ends with one error line naming the
    first (its pid and host)."""
    wd = f"{gcs}/two"
    first = subprocess.Popen([sys.executable, "-m", "train", *cli_args(make_config(wd, data_dir, steps=10_000))],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lease, deadline = _blob(f"{wd}/{LEASE}"), time.time() + 120
        while not lease.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert lease.exists() and first.poll() is None
        second = subprocess.run([sys.executable, "-m", "train", *cli_args(make_config(wd, data_dir))], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first still runs: the refusal was about a live holder
    finally:
        first.kill()
        first.wait()
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
    assert f"{wd} is in use by another run (pid {first.pid} on {socket.gethostname()}" in errors[0]
    assert "Traceback" not in second.stderr
