"""Fault injection: storage errors on restore, two runs on one workdir, stale leases, and bad values that
must stop a run before it writes anything."""
import glob
import json
import os
import socket
import time

import numpy as np
import pytest

from infra.checkpoint import CheckpointError, Checkpointer
from infra.lease import LEASE, LeaseError, WorkdirLease
from infra.metrics import MetricsLogger, read_metrics
from tests.test_checkpoint import STEPS, compilation_cache, copy_run, data_dir, losses, make_config, reference  # noqa: F401
from train.loop import train


def _break(step_dir):
    """Make a checkpoint unreadable: its largest array file cut in half."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)


def test_no_usable_checkpoint_stops_instead_of_starting_over(data_dir, tmp_path_factory, tmp_path):
    wd = copy_run(reference("adamw", data_dir, tmp_path_factory), tmp_path / "run")
    ckpts = wd / "checkpoints"
    for step in Checkpointer(ckpts).steps():  # 3 and 6
        _break(ckpts / str(step))
    before = sorted(os.listdir(ckpts))
    with pytest.raises(CheckpointError, match=r"(?s)none of the 2 checkpoint\(s\).*\n  step 6: .*\n  step 3: .*start_over"):
        train(make_config(wd, data_dir, steps=STEPS))
    assert sorted(os.listdir(ckpts)) == before  # nothing renamed: a storage outage must not discard the run
    summary = train(make_config(wd, data_dir, steps=STEPS, start_over=True))
    assert summary["step"] == STEPS and len(glob.glob(str(ckpts / "*.unusable-*"))) == 2


def test_transient_read_error_is_retried(data_dir, tmp_path_factory, tmp_path, monkeypatch, capsys):
    wd = copy_run(reference("adamw", data_dir, tmp_path_factory), tmp_path / "run")
    real, calls = Checkpointer._read, []

    def flaky(self, step, *args):
        calls.append(step)
        if len(calls) == 1:
            raise OSError("simulated: connection reset by peer")
        return real(self, step, *args)

    monkeypatch.setattr(Checkpointer, "_read", flaky)
    monkeypatch.setattr(Checkpointer, "__init__", _fast_retries(Checkpointer.__init__))
    summary = train(make_config(wd, data_dir, steps=STEPS + 1))
    assert calls == [STEPS, STEPS] and summary["step"] == STEPS + 1  # the latest, read on the second try
    assert "retrying" in capsys.readouterr().out
    assert not glob.glob(str(wd / "checkpoints" / "*.unusable-*"))


def _fast_retries(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.retry_wait_s = 0.01
    return wrapped


def test_set_aside_checkpoints_are_bounded(tmp_path, capsys):
    ck = Checkpointer(tmp_path / "ck", keep_set_aside=2)
    for i in range(3):
        old = tmp_path / "ck" / f"{i}.unusable-2026010{i}-000000"
        old.mkdir()
        os.utime(old, (time.time() - 100 + i, time.time() - 100 + i))
    (tmp_path / "ck" / "7").mkdir()
    ck._move_aside([str(tmp_path / "ck" / "7")], "unusable")
    kept = sorted(os.path.basename(p) for p in ck.set_aside("unusable"))
    assert len(kept) == 2 and kept[0].startswith("2.") and kept[1].startswith("7.")
    out = capsys.readouterr().out
    assert "deleted" in out and "0.unusable" in out and "1.unusable" in out


def test_two_runs_on_one_workdir(data_dir, tmp_path):
    wd = tmp_path / "run"
    with WorkdirLease(str(wd)):
        with pytest.raises(LeaseError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
            train(make_config(wd, data_dir))
        assert not (wd / "config.json").exists() and not (wd / "checkpoints").exists()
    assert not (wd / LEASE).exists()  # released


@pytest.mark.parametrize("record", [
    {"holder": "x", "host": socket.gethostname(), "pid": 2**22 + 12345, "heartbeat": time.time()},  # killed
    {"holder": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600},  # no heartbeat for 1 h
])
def test_stale_lease_is_taken_over(data_dir, tmp_path, capsys, record):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / LEASE).write_text(json.dumps({**record, "started": record["heartbeat"]}))
    assert train(make_config(wd, data_dir, steps=3, checkpoint_every=3))["step"] == 3
    assert "taking over the lease" in capsys.readouterr().out
    assert not (wd / LEASE).exists()


@pytest.mark.parametrize("overrides,message", [
    ({"optimizer.name": "velo", "optimizer.lr": -1.0}, "optimizer.lr=-1.0 is out of range: it must be a finite number"),
    ({"optimizer.name": "adamw", "optimizer.lr": -1e-3}, "optimizer.lr=-0.001 is out of range"),
    ({"optimizer.lr": float("nan")}, "optimizer.lr=nan is out of range: it must be a finite number >= 0"),
    ({"optimizer.lr": float("inf")}, "optimizer.lr=inf is out of range"),
    ({"optimizer.adamw.eps": -1.0}, r"optimizer.adamw.eps=-1.0 is out of range: it must be a finite number > 0"),
    ({"optimizer.min_lr_ratio": -1.0}, r"optimizer.min_lr_ratio=-1.0 .* in \[0, 1\]"),
    ({"optimizer.adamw.b2": 1.5}, r"optimizer.adamw.b2=1.5 .* in \[0, 1\)"),
    ({"optimizer.weight_decay": -1.0}, "optimizer.weight_decay=-1.0 is out of range"),
    ({"optimizer.decay_fraction": 2.0}, r"optimizer.decay_fraction=2.0 .* in \(0, 1\]"),
    ({"optimizer.name": "sgd"}, "optimizer.name='sgd' is out of range: it must be one of adamw, muon, celo2"),
    ({"cpu_devices": -3}, "cpu_devices=-3 is out of range: it must be an integer >= 0"),
    ({"mesh.data": 0}, "mesh.data=0 is out of range: it must be -1 or an integer >= 1"),
    ({"model.vocab_size": 100}, r"model.vocab_size=100 is smaller than the tokenizer's vocabulary \(400\)"),
    ({"workdir": ""}, "workdir=an empty string is out of range: it must be a non-empty string"),
    ({"eval_batches": 0}, "eval_batches=0 is out of range: it must be an integer >= 1"),
])
def test_bad_values_stop_before_anything_is_written(data_dir, tmp_path, overrides, message):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text("{}")  # a previous run's: must survive
    cfg = make_config(wd, data_dir)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert (wd / "config.json").read_text() == "{}" and sorted(os.listdir(wd)) == ["config.json"]


def test_corpus_that_is_not_utf8_is_refused_with_file_and_offset(tmp_path):
    import data

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("plain text\n" * 50)
    (texts / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 3)
    with pytest.raises(ValueError, match=r"b.txt: not UTF-8 at byte 3 .*iconv -f latin1"):
        data.ensure_prepared(tmp_path / "data", corpus=texts, vocab_size=300, verbose=False)


def test_metrics_file_is_strict_json(tmp_path):
    log = MetricsLogger(str(tmp_path), 3, 0, progress=False)
    log.write(1, {"loss": 2.5})
    log.write(2, {"loss": float("nan"), "grad_norm": float("-inf")})
    log.close()

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[1] == {"step": 2, "loss": "nan", "grad_norm": "-inf", "nonfinite": ["loss", "grad_norm"]}
    back = read_metrics(str(tmp_path))
    assert np.isnan(back[1]["loss"]) and back[1]["grad_norm"] == -np.inf and "nonfinite" not in back[1]
    assert losses(tmp_path)[1] == 2.5


def test_metrics_row_being_written_is_not_read_and_a_cut_row_is_dropped(tmp_path):
    log = MetricsLogger(str(tmp_path), 3, 0, progress=False)
    log.write(1, {"loss": 2.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a row caught mid-write (a reader), or cut by a kill (a resumed logger)
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5}]
    log = MetricsLogger(str(tmp_path), 3, 1, progress=False)
    log.write(2, {"loss": 2.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n'


@pytest.mark.parametrize("args,message", [
    (["-m", "train", "--config", "configs/cpu_tiny.py", "--config.optimizer.lrr=1"], 'Did you mean "lr"'),
    (["-m", "train", "--config", "configs/no_such_preset.py"], "no_such_preset.py"),
    (["-m", "tools.sample", "--workdir", "/nonexistent/run"], "has no config.json"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    import subprocess
    import sys

    from tests.test_checkpoint import ROOT

    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nan_loss_names_the_checkpoint_a_rerun_resumes_from(data_dir, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from train.build import Run
    from train.loop import NonFiniteLoss

    real = Run.train_step

    def poisoned(run):  # the loss turns NaN at step 5 (checkpoints every 3 steps)
        step = real.__get__(run)

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            return state, {**metrics, "loss": jnp.where(state.step >= 5, jnp.nan, metrics["loss"])}
        return wrapped

    monkeypatch.setattr(Run, "train_step", property(poisoned))
    with pytest.raises(NonFiniteLoss, match=r"became nan at step 5 .*resumes from its last checkpoint, .*/checkpoints/3"):
        train(make_config(tmp_path / "run", data_dir))
    assert max(losses(tmp_path / "run")) <= 4  # the NaN row was never logged


def test_a_stopped_comparison_run_stops_the_comparison_resumably(tmp_path, monkeypatch):
    """A signal stops the current run at a checkpoint; the comparison then stops too (exit 0, no traceback)
    and records no result for that run, so the next invocation resumes it."""
    import train.loop
    from tests.test_compare import small_comparison
    from tools.compare import Comparison, Stopped

    monkeypatch.setattr(train.loop, "train", lambda cfg: {"stopped_early": True, "step": 2})
    comparison = Comparison(small_comparison(tmp_path / "cmp", tmp_path / "data"))
    with pytest.raises(Stopped, match="stopped early .*rerun the command to resume"):
        comparison.execute()
    assert not glob.glob(str(tmp_path / "cmp" / "runs" / "*" / "done.json"))


def _one_error_line(proc, message: str) -> None:
    """The command failed with exit code 2 and one ``error:`` line holding ``message``, and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _command(args, **kwargs):
    import subprocess
    import sys

    from tests.test_checkpoint import ROOT

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def test_sampling_a_corrupt_checkpoint_is_one_line(data_dir, tmp_path_factory, tmp_path):
    wd = copy_run(reference("adamw", data_dir, tmp_path_factory), tmp_path / "run")
    for array_file in glob.glob(str(wd / "checkpoints" / "*" / "state" / "ocdbt.process_*" / "d" / "*")):
        with open(array_file, "r+b") as f:  # every array cut in half: the parameters' too
            f.truncate(os.path.getsize(array_file) // 2)
    proc = _command(["-m", "tools.sample", "--workdir", str(wd), "--max_tokens", "4"])
    _one_error_line(proc, f"no checkpoint at {wd} can be restored")
    assert "restore it from a copy" in proc.stderr
    assert "Exception ignored" not in proc.stderr and len(proc.stderr.splitlines()) < 20


@pytest.fixture
def without_gcs_libraries(tmp_path):
    """An environment in which gcsfs and google.cloud cannot be imported, as without the gcs extra."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gcsfs' or name.startswith('google.cloud'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n")
    return dict(os.environ, PYTHONPATH=str(site))


def test_gs_paths_without_the_gcs_extra_name_it(without_gcs_libraries, tmp_path):
    proc = _command(["-m", "train", "--config", "configs/cpu_tiny.py", "--config.workdir=gs://bucket/run"],
                    env=without_gcs_libraries)
    _one_error_line(proc, 'gs://bucket/run: gs:// paths need the gcs extra')
    assert 'pip install -e ".[gcs]"' in proc.stderr
    proc = _command(["-m", "data", "prepare", "--corpus", "shakespeare", "--out", "gs://bucket/data"],
                    env=without_gcs_libraries)
    _one_error_line(proc, 'pip install -e ".[gcs]"')


def test_missing_google_credentials_are_explained():
    from google.auth.exceptions import DefaultCredentialsError

    from infra.cli import explain

    assert "gcloud auth application-default login" in explain(DefaultCredentialsError("Your default credentials "
                                                                                      "were not found."))
    assert explain(ValueError("an ordinary error")) is None


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a directory on a file system of ``size`` (a tmpfs, "1m", "8m"), where writing more
    fails with ENOSPC; the test is skipped where mounting is not allowed."""
    import subprocess

    mounts = []

    def mount(size: str):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs is not allowed here")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_during_preparation_is_one_line_and_leaves_no_temporary_file(small_disk):
    full_disk = small_disk("1m")  # Shakespeare's 1.6M tokens need 3 MB
    proc = _command(["-m", "data", "prepare", "--corpus", "shakespeare", "--out", str(full_disk / "data"),
                     "--vocab_size", "512", "--workers", "1"])
    _one_error_line(proc, "no space left on the device")
    assert "rerun the same command" in proc.stderr
    left = [p for p in glob.glob(str(full_disk / "**" / "*"), recursive=True) if ".tmp" in os.path.basename(p)]
    assert not left, left


def test_a_failed_checkpoint_save_stops_the_run_at_once_with_one_line(small_disk, data_dir):
    """On a full disk the second checkpoint (5.3 MB beside the first) cannot be written: the run stops at the
    first step after the failure, not at the next save, naming the step and the checkpoint a rerun resumes from."""
    from tests.test_checkpoint import cli_args

    wd = small_disk("8m") / "run"
    cfg = make_config(wd, data_dir, steps=60, checkpoint_every=20)
    proc = _command(["-m", "train", *cli_args(cfg), "--config.keep_checkpoints=1"])
    _one_error_line(proc, f"saving the checkpoint of step 40 in {wd / 'checkpoints'} failed (no space left")
    assert f"the last complete checkpoint is {wd / 'checkpoints' / '20'}, where a rerun resumes" in proc.stderr
    assert len(proc.stderr.splitlines()) < 30 and "Exception in thread" not in proc.stderr
    steps = [r["step"] for r in read_metrics(str(wd)) if "loss" in r]
    assert max(steps) < 60  # stopped before the next save was due
    assert "No space left on device" in (wd / "library.log").read_text()  # the libraries' reports, kept
    assert sorted(os.listdir(wd / "checkpoints")) == ["20"]  # the failed save left nothing behind


def test_restoring_corrupt_checkpoints_keeps_library_noise_off_the_terminal(data_dir, tmp_path_factory, tmp_path):
    """Every checkpoint damaged: the run stops with its one error (naming each checkpoint and why) and the
    library log; orbax's and tensorstore's thousands of lines of reports go to that log."""
    from tests.test_checkpoint import cli_args

    wd = copy_run(reference("adamw", data_dir, tmp_path_factory), tmp_path / "run")
    for step in Checkpointer(wd / "checkpoints").steps():
        _break(wd / "checkpoints" / str(step))
    proc = _command(["-m", "train", *cli_args(make_config(wd, data_dir, steps=STEPS))])
    _one_error_line(proc, "none of the 2 checkpoint(s)")
    assert len(proc.stderr.splitlines()) < 40 and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_written_atomically_get_the_mode_open_would_give(tmp_path, umask):
    import stat

    from infra.files import write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "config.json", b"{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_prepared_data_dir_is_readable_like_its_shards(data_dir):
    """meta.json and tokenizer.model (written atomically) have the mode of the shards beside them."""
    import stat

    modes = {os.path.relpath(p, data_dir): stat.S_IMODE(os.stat(p).st_mode)
             for p in glob.glob(os.path.join(data_dir, "**", "*"), recursive=True) if os.path.isfile(p)}
    assert len(set(modes.values())) == 1, modes
