"""A ``jax.profiler`` trace of chosen steps (``--config.profile_steps=START,END``).

The trace covers steps START through END (counted from 1, as ``metrics.jsonl`` counts them): it starts
before step START is dispatched and stops once step END has finished on the devices. Every process of a job
writes its own trace, into ``<workdir>/profile/process_<i>/`` (``plugins/profile/<time>/<host>.xplane.pb``),
which TensorBoard's profile plugin (``tensorboard --logdir <workdir>/profile``) and Perfetto read. The
jitted train step appears in it as ``jit_train_step``.
"""
from __future__ import annotations

import jax

from infra.files import join


def profile_window(text: str, steps: int) -> tuple[int, int] | None:
    """(START, END) of ``profile_steps`` ("" for none), checked against the run's ``steps``."""
    if not text.strip():
        return None
    try:
        start, end = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"profile_steps={text!r} must be START,END (two step numbers, e.g. 10,12)") from None
    if not 1 <= start <= end <= steps:
        raise ValueError(f"profile_steps={text!r} must satisfy 1 <= START <= END <= steps={steps}")
    return start, end


class Profiler:
    """The step hook that starts and stops the trace (the module docstring) of a run that starts after
    ``start_step`` steps: a run resumed past START takes no (partial) trace."""

    def __init__(self, workdir: str, window: tuple[int, int], start_step: int):
        self.directory = join(workdir, "profile", f"process_{jax.process_index()}")
        self.start, self.end = window
        self.tracing = False
        self._maybe_start(start_step)  # START is the run's first step

    def __call__(self, info) -> None:
        if self.tracing and info.step == self.end:
            jax.block_until_ready(info.state)  # the trace holds step END's device work
            self.close()
        self._maybe_start(info.step)

    def _maybe_start(self, done: int) -> None:
        if done == self.start - 1:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def close(self) -> None:
        """Stop the trace if it is running (a run that stops before END keeps the steps traced so far)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
