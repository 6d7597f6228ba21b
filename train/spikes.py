"""Skipping loss spikes (``--config.loss_spike.factor=F``; off at 0).

Step s is skipped (its update is not applied; the step count and the data still advance) when its loss
exceeds

    max_loss(s) = F x median of the losses of the last ``window`` applied steps among steps 1 .. s - 2,

infinite until ``window`` losses are known. Steps up to s - 2 only: the loop dispatches step s before it has
read step s - 1's loss, so the threshold of every step is a function of the run's history alone, the same
whether a run goes through or is resumed from a checkpoint (the history travels in the checkpoint). After
``max_skips`` skipped steps in a row the run stops (``LossSpikes``): it is diverging, not spiking.
"""
from __future__ import annotations

import math
import statistics


class LossSpikes(RuntimeError):
    pass


class SpikeGuard:
    """The host side of the skipping: thresholds before each step, the record of each step's metrics."""

    def __init__(self, factor: float, window: int, max_skips: int, saved: dict | None = None):
        self.factor, self.window, self.max_skips = factor, window, max_skips
        saved = saved or {}
        self.losses = [tuple(x) for x in saved.get("losses", [])]  # (step, loss) of applied steps
        self.in_a_row, self.skipped = saved.get("in_a_row", 0), saved.get("skipped", 0)

    def max_loss(self, step: int) -> float:
        known = [loss for s, loss in self.losses if s <= step - 2][-self.window:]
        return self.factor * statistics.median(known) if len(known) == self.window else math.inf

    def record(self, step: int, metrics: dict) -> None:
        """Count a skipped step or keep an applied step's loss; ``metrics`` gains ``skipped_steps``."""
        if metrics.get("skipped"):
            self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        else:
            self.in_a_row = 0
            self.losses = (self.losses + [(step, metrics["loss"])])[-(self.window + 2):]
        metrics["skipped_steps"] = float(self.skipped)

    def check(self, step: int, metrics: dict) -> None:
        """``LossSpikes`` after ``max_skips`` skipped steps in a row."""
        if self.in_a_row >= self.max_skips:
            raise LossSpikes(
                f"{self.in_a_row} steps in a row up to step {step} had a loss above loss_spike.factor="
                f"{self.factor:g} x the median of the last {self.window} (loss {metrics['loss']:.4g} > "
                f"{self.max_loss(step):.4g}): the run diverges; lower --config.optimizer.lr, or raise "
                f"--config.loss_spike.factor / max_skips")

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run skips exactly the steps the whole run would."""
        return {"losses": self.losses, "in_a_row": self.in_a_row, "skipped": self.skipped}
