"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars and a progress bar.

Only process 0 writes; every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os

import jax
from tqdm import tqdm


class MetricsLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.rows: list[dict] = []
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         desc="train", smoothing=0.1)

    def write(self, step: int, row: dict) -> None:
        """Append one row (``step`` plus scalars) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in row.items()}}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
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


def read_metrics(workdir: str) -> list[dict]:
    """All rows of a run's metrics.jsonl (a resumed run's rows for a step replace the earlier ones)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]
