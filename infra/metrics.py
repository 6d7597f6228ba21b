"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars, a progress bar, and
optionally the same rows in Weights & Biases (``infra.wandb_run``).

``metrics.jsonl`` is strict JSON: a NaN or infinite value is written as the string "nan", "inf" or "-inf" and
its name listed under ``"nonfinite"`` (``read_metrics`` turns them back into floats).

On object storage (a ``gs://`` workdir), where an object cannot be appended to, the logger keeps the
file's lines in memory (starting from what an earlier run of the workdir left) and replaces the whole
``metrics.jsonl`` object after every row: readers always see a complete file. TensorBoard events are written
to a local temporary directory and each event file is uploaded (as a whole, replacing the previous upload)
to ``<workdir>/tensorboard/`` after every row and on close.

A row is complete when its newline is written: ``read_metrics`` ignores a last line without one (a row a
running trainer is writing at that moment, as a report made while runs train may see on a network
filesystem, or the fragment a kill mid-write left), and a logger that reopens the file drops such a
fragment before it appends, so that it never runs into the next row.

Used by training (rows keyed by ``step``) and meta-training (keyed by ``iteration``). Only process 0
writes; every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import jax
from tqdm import tqdm

from infra.files import is_uri, join, makedirs, read_text, write_atomic
from infra.wandb_run import WandbRun


class MetricsLogger:
    """Appends rows ``{key: step, name: float, ...}`` to ``<workdir>/metrics.jsonl`` and TensorBoard, and
    drives a progress bar from ``start`` to ``total`` (``progress=False``: no bar)."""

    def __init__(self, workdir: str, total: int, start: int, *, key: str = "step", desc: str = "train",
                 progress: bool = True, wandb: dict | None = None, config: dict | None = None):
        """``wandb``: the run's ``wandb`` settings (``infra.wandb_run``; off without a project), ``config``
        the config W&B records."""
        self.enabled = jax.process_index() == 0
        self.key = key
        self.rows: list[dict] = []
        if not self.enabled:
            return
        self._wandb = WandbRun(workdir, wandb, config or {}) if wandb and wandb.get("project") else None
        from tensorboardX import SummaryWriter

        makedirs(workdir)
        self.path = join(workdir, "metrics.jsonl")
        self._file = _ObjectAppender(self.path) if is_uri(self.path) else _open_local_appender(self.path)
        self._tb_dir = join(workdir, "tensorboard")
        self._tb_local = tempfile.mkdtemp(prefix="tensorboard-") if is_uri(workdir) else None
        self._tb = SummaryWriter(self._tb_local or self._tb_dir)
        self._bar = tqdm(total=total, initial=start, unit=key, dynamic_ncols=True, desc=desc, smoothing=0.1,
                         disable=not progress)

    def write(self, step: int, row: dict) -> None:
        """Append one row (``key`` plus scalars) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        row = {self.key: int(step), **{k: float(v) for k, v in row.items() if k != self.key}}
        self.rows.append(row)
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        line = {k: (str(v) if k in bad else v) for k, v in row.items()}
        self._file.write(json.dumps({**line, "nonfinite": bad} if bad else line, allow_nan=False) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != self.key and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in row.items() if k != self.key})
        self._upload_events()

    def _upload_events(self) -> None:
        """Object storage: copy the local event files to ``<workdir>/tensorboard/``."""
        if self._tb_local is not None:
            for name in os.listdir(self._tb_local):
                with open(os.path.join(self._tb_local, name), "rb") as f:
                    write_atomic(join(self._tb_dir, name), f.read())

    def progress(self, step: int, **postfix) -> None:
        if self.enabled:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)

    def print(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

    def close(self) -> None:
        if self.enabled:
            if self._wandb is not None:
                self._wandb.finish()
            self._bar.close()
            self._file.close()
            self._tb.close()
            self._upload_events()
            if self._tb_local is not None:
                shutil.rmtree(self._tb_local, ignore_errors=True)


def _complete_rows(text: str) -> str:
    """``text`` up to its last newline: the rows whose writing has finished."""
    return text[:text.rfind("\n") + 1]


def _open_local_appender(path: str):
    """``path`` opened for appending, an unfinished last row (a kill mid-write) cut off first."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")


class _ObjectAppender:
    """A file opened for appending, on object storage: the lines so far in memory, and the whole object
    rewritten (one atomic upload) on every flush."""

    def __init__(self, path: str):
        self.path = path
        try:
            text = read_text(path)
        except FileNotFoundError:
            text = ""
        self._parts = [_complete_rows(text)]

    def write(self, text: str) -> None:
        self._parts.append(text)

    def flush(self) -> None:
        self._parts = ["".join(self._parts)]
        write_atomic(self.path, self._parts[0].encode())

    def close(self) -> None:
        self.flush()


def read_metrics(workdir: str | os.PathLike, key: str = "step") -> list[dict]:
    """All rows of a run's metrics.jsonl merged per ``key`` (later rows for a step update the earlier ones,
    e.g. after a resume), in step order; [] if the run has logged nothing yet. ``workdir`` may be a URI."""
    try:
        text = read_text(join(workdir, "metrics.jsonl"))
    except FileNotFoundError:
        return []
    rows = {}
    for line in _complete_rows(text).splitlines():
        if line.strip():
            row = json.loads(line)
            for k in row.pop("nonfinite", ()):
                row[k] = float(row[k])
            rows.setdefault(row[key], {}).update(row)
    return [rows[s] for s in sorted(rows)]
