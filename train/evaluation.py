"""Evaluating a run's parameters: held-out loss and bits per byte, and multiple-choice tasks (``train.tasks``).

Held-out loss: the mean masked cross-entropy over the held-out batches (``data.eval_batches``),

    loss = sum_batches sum_{b,l} mask * CE / sum_batches sum_{b,l} mask   (nats per token),

and beside it the same loss as bits per byte of text, ``bpb = loss / ln 2 / bytes_per_token`` (the data dir's
UTF-8 bytes per held-out token, ``data.DatasetInfo.bits_per_byte``), which does not depend on the tokenizer.
A data dir prepared before bytes were counted has no bpb. Used by the trainer's evaluation hook and by
``tools.evaluate``.
"""
from __future__ import annotations

import jax

from train.tasks import Task, encode_task, score_task, task_row


def heldout_loss(run, params, batches) -> tuple[float, float]:
    """(mean loss in nats per token, tokens counted) of ``params`` over ``batches`` (global arrays)."""
    # one batch in flight at a time: many collective programs queued at once can deadlock XLA's CPU
    # collectives (device threads joining different programs' rendezvous)
    total = count = 0.0
    with jax.set_mesh(run.mesh):
        for b in batches:
            loss_sum, n = jax.device_get(run.eval_step(params, b))
            total, count = total + float(loss_sum), count + float(n)
    return total / count, count


def heldout_row(info, loss: float, key: str = "eval_loss") -> dict[str, float]:
    """``{key: loss}`` and its bits per byte under ``key`` with "loss" read "bpb" (``eval_loss`` ->
    ``eval_bpb``, ``eval_loss_full`` -> ``eval_bpb_full``), left out when ``info`` has no byte counts."""
    bpb = info.bits_per_byte(loss)
    return {key: loss} if bpb is None else {key: loss, key.replace("loss", "bpb"): bpb}


class TaskScorer:
    """The rows of ``tasks`` for a run's parameters, each task encoded once (``train.tasks.encode_task``)."""

    def __init__(self, run, tasks: list[Task], progress: bool = True):
        self.run, self.tasks, self.progress = run, tasks, progress
        info = run.data
        self.encoded = [encode_task(t, info.tokenizer, info.bos_id, run.cfg.seq_len) for t in tasks]

    def results(self, params) -> list:
        return [score_task(self.run, params, t, e, self.progress) for t, e in zip(self.tasks, self.encoded)]

    def row(self, params) -> dict[str, float]:
        row = {}
        for res in self.results(params):
            row.update(task_row(res))
        return row
