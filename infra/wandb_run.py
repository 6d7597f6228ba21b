"""A run's rows in Weights & Biases too (the ``wandb`` extra), beside ``metrics.jsonl`` and TensorBoard.

``--config.wandb.project=P`` turns it on (``entity``, ``group`` and ``name`` as W&B knows them; the name
defaults to the workdir's). The W&B run gets the run's resolved config as its config and the same rows,
keyed by the step. Its id is kept in ``<workdir>/wandb_id.txt``, so that a resumed run continues the same W&B
run. W&B's own files go to ``<workdir>/wandb/`` (a local temporary directory for a ``gs://`` workdir).
``WANDB_MODE=offline`` keeps everything local (``wandb sync`` uploads it later), as on cluster nodes without
internet.
"""
from __future__ import annotations

import os
import tempfile
import uuid

from infra.files import is_uri, join, read_text, resolve, write_text


def check_wandb(settings) -> None:
    """ValueError naming the extra when W&B logging is asked for (a project) and wandb is not installed."""
    if settings["project"]:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ValueError(f'wandb.project={settings["project"]!r} needs the wandb extra ({e}): '
                             'pip install -e ".[wandb]"') from None


class WandbRun:
    """The W&B run of a workdir: ``log(step, row)`` and ``finish()``."""

    def __init__(self, workdir: str, settings: dict, config: dict):
        check_wandb(settings)
        import wandb

        id_file = join(workdir, "wandb_id.txt")
        try:
            run_id = read_text(id_file).strip()
        except FileNotFoundError:
            run_id = uuid.uuid4().hex[:12]
            write_text(id_file, run_id + "\n")
        directory = tempfile.mkdtemp(prefix="wandb-") if is_uri(workdir) else workdir
        self._run = wandb.init(project=settings["project"], entity=settings["entity"] or None,
                               group=settings["group"] or None,
                               name=settings["name"] or os.path.basename(resolve(workdir).rstrip("/")),
                               id=run_id, resume="allow", dir=directory, config=config)

    def log(self, step: int, row: dict) -> None:
        self._run.log(dict(row), step=int(step))

    def finish(self) -> None:
        self._run.finish()
