"""Checkpoints of a run with orbax: the train state (params, optimizer state, step), the data iterator's
state and the resolved config, saved asynchronously and atomically (orbax writes into a temporary
directory and renames it when the save is complete, so a crash never leaves a half-written checkpoint
that looks finished).

Restoring always goes into abstract targets carrying the *current* mesh's shardings, so a run saved on
one mesh resumes on another. A checkpoint that fails to restore (truncated or corrupt files) is skipped
with a warning naming it, and the previous one is tried; nothing is deleted.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state):
        """Train state of ``step``.

        The data iterator's saved state is not read back: the pipeline's position is a pure function of
        the step (``data.train_iterator(..., start_step=step)``), which also holds when the number of
        processes changed, whereas grain's saved state is per process.
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

    def restore_latest(self, abstract_state):
        """(step, state) of the newest checkpoint that restores cleanly, or (None, None) if there is none."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                msg = (f"checkpoint {os.path.join(self.directory, str(step))} could not be restored "
                       f"({type(e).__name__}: {str(e)[:300]}); trying the previous one")
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
        return None, None

    def config(self, step: int) -> dict:
        with open(os.path.join(self.directory, str(step), "config", "metadata")) as f:
            return json.load(f)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
