"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars and a progress bar.

``metrics.jsonl`` is strict JSON: a NaN or infinite value is written as the string "nan", "inf" or "-inf" and
its name listed under ``"nonfinite"`` (``read_metrics`` turns them back into floats).

Used by training (rows keyed by ``step``) and meta-training (keyed by ``iteration``). Only process 0
writes; every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os

import jax
from tqdm import tqdm


class MetricsLogger:
    """Appends rows ``{key: step, name: float, ...}`` to ``<workdir>/metrics.jsonl`` and TensorBoard, and
    drives a progress bar from ``start`` to ``total`` (``progress=False``: no bar)."""

    def __init__(self, workdir: str, total: int, start: int, *, key: str = "step", desc: str = "train",
                 progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.key = key
        self.rows: list[dict] = []
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
            self._bar.close()
            self._file.close()
            self._tb.close()


def read_metrics(workdir: str | os.PathLike, key: str = "step") -> list[dict]:
    """All rows of a run's metrics.jsonl merged per ``key`` (later rows for a step update the earlier ones,
    e.g. after a resume), in step order; [] if the run has logged nothing yet."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                for k in row.pop("nonfinite", ()):
                    row[k] = float(row[k])
                rows.setdefault(row[key], {}).update(row)
    return [rows[s] for s in sorted(rows)]
