"""Evaluate a trained run: held-out loss and bits per byte on prepared data dirs, accuracy on multiple-choice tasks.

    python -m tools.evaluate --workdir W [--step N] [--data DIR ...] [--tasks FILE ...] [--batches N] [--json OUT]
        [--mesh DATA,FSDP,TENSOR]

Builds the run from its saved ``config.json`` on its own mesh and attention kernel (on CPU with the simulated
device count the trainer used; ``--mesh`` for another mesh, e.g. fewer devices than it trained on), restores
the parameters of step N (default: the latest checkpoint) and scores

- the held-out split of each ``--data`` dir (default: the run's own), all of it or its first ``--batches``
  batches of the run's batch size and sequence length: mean loss in nats per token and bits per byte
  (``train.evaluation``). A data dir must use the run's tokenizer (the sha256 in its meta.json);
- each ``--tasks`` file (``train.tasks``): acc, acc_norm and the number of items.

It prints a table and writes the numbers as JSON to ``--json`` (default ``<workdir>/evaluations/step_<N>.json``).
The held-out loss on the run's own data over the whole split is the trainer's ``eval_loss_full``.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import jax
import ml_collections
from tqdm import tqdm

import data
from data.shards import sha256_file
from infra.checkpoint import candidates, restore_params
from infra.cli import user_errors
from infra.files import exists, join, makedirs, read_text, write_text
from infra.ranges import flag_type
from train.build import build_run, setup_platform
from train.config import upgrade_saved, with_dataset
from train.evaluation import heldout_loss
from train.tasks import read_tasks, score_task


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
    if not exists(join(workdir, "config.json")):
        raise ValueError(f"{workdir} has no config.json (not a training run's workdir)")
    return ml_collections.ConfigDict(json.loads(read_text(join(workdir, "config.json"))))


def checkpoint_dir(workdir: str, step: int | None) -> str:
    """The step dir of ``step`` (None: the latest) in the run's checkpoints; ValueError when there is none."""
    try:
        dirs = candidates(workdir)
    except FileNotFoundError:
        raise ValueError(f"{workdir} has no checkpoint: train the run first (a checkpoint is written every "
                         "checkpoint_every steps and at the last step)") from None
    steps = {int(d.rstrip("/").rsplit("/", 1)[-1]): d for d in dirs}
    if step is None:
        return dirs[0]
    if step not in steps:
        raise ValueError(f"{workdir} has no checkpoint of step {step}; its checkpoints are of steps "
                         f"{', '.join(map(str, sorted(steps)))}: pass one of them to --step")
    return steps[step]


def load_run(workdir: str, step: int | None = None, mesh: tuple[int, int, int] | None = None):
    """(run, params, step): the run of ``workdir`` built from its config.json on all devices (on the first
    data x fsdp x tensor of them as that mesh when ``mesh`` is given), with the parameters of ``step``
    (default the latest checkpoint) restored into the mesh's shardings."""
    cfg = _saved_config(workdir)
    info = data.load_info(cfg.data.dir)  # never prepares: the run's data exists
    cfg = ml_collections.ConfigDict(upgrade_saved(cfg.to_dict(), info.vocab_size))
    devices = None
    if mesh is not None:
        cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
        devices = None if -1 in mesh else jax.devices()[:math.prod(mesh)]
    run = build_run(with_dataset(cfg, info.vocab_size), devices, dataset=info)
    try:
        run.mesh
    except ValueError as e:
        raise ValueError(f"{e} (for tools.evaluate: --mesh DATA,FSDP,TENSOR)") from None
    restored, params = restore_params(checkpoint_dir(workdir, step), run.params_layout.abstract)
    return run, params, restored


def tokenizer_sha256(info) -> str:
    """The sha256 of a data dir's tokenizer as its meta.json records it (hashed now when it does not)."""
    return info.meta.get("tokenizer", {}).get("sha256") or sha256_file(info.tokenizer_path)


def heldout(run, params, data_dir: str | None, batches: int | None, progress: bool = True) -> dict:
    """Held-out loss, bits per byte and tokens counted of ``params`` on ``data_dir`` (None: the run's)."""
    info = run.data if data_dir is None else data.load_info(data_dir)
    if tokenizer_sha256(info) != tokenizer_sha256(run.data):
        raise ValueError(f"{info.data_dir} was tokenized with another tokenizer than the run's data "
                         f"{run.data.data_dir} (tokenizer sha256 differs), so its loss would not mean anything: "
                         f"prepare it with the run's tokenizer (python -m data prepare --tokenizer "
                         f"{run.data.tokenizer_path} ...)")
    loss, tokens = heldout_loss(run, params, _progress(run.eval_batches(batches, info), progress, info.data_dir))
    return {"data_dir": info.data_dir, "loss": loss, "bpb": info.bits_per_byte(loss), "tokens": int(tokens),
            "bytes_per_token": info.bytes_per_token()}


def _progress(batches: list, on: bool, name: str):
    return tqdm(batches, desc=f"held-out {name}", unit="batch", leave=False, dynamic_ncols=True,
                disable=not on or jax.process_index() != 0)


def evaluate(workdir: str, step: int | None = None, data_dirs=(), task_files=(), batches: int | None = None,
             mesh: tuple[int, int, int] | None = None, progress: bool = True) -> dict:
    """The evaluation of the run in ``workdir`` (module docstring) as a dict (what ``--json`` holds); each
    task's ``lls`` are its items' per-ending log-likelihoods."""
    tasks = read_tasks(",".join(task_files))  # bad task files fail before anything is loaded
    for d in data_dirs:  # and so does a data dir that is not prepared
        data.load_info(d)
    run, params, restored = load_run(workdir, step, mesh)
    out = {"workdir": workdir, "step": restored, "model": run.cfg.model.name, "mesh": dict(run.mesh.shape),
           "heldout": [heldout(run, params, d, batches, progress) for d in (list(data_dirs) or [None])],
           "tasks": []}
    for task in tasks:
        res = score_task(run, params, task, progress=progress)
        out["tasks"].append({"name": res.name, "file": task.path, "acc": res.acc, "acc_norm": res.acc_norm,
                             "count": res.count, "lls": [ll.tolist() for ll in res.lls]})
    return out


def table(result: dict) -> str:
    """The evaluation as a small text table."""
    lines = [f"{result['workdir']} at step {result['step']} ({result['model']}, mesh {result['mesh']})",
             f"{'held-out data':<48} {'tokens':>10} {'loss':>8} {'bits/byte':>10}"]
    for h in result["heldout"]:
        bpb = "-" if h["bpb"] is None else f"{h['bpb']:.4f}"
        lines.append(f"{h['data_dir']:<48} {h['tokens']:>10,} {h['loss']:>8.4f} {bpb:>10}")
    if result["tasks"]:
        lines.append(f"{'task':<48} {'items':>10} {'acc':>8} {'acc_norm':>10}")
        for t in result["tasks"]:
            lines.append(f"{t['name']:<48} {t['count']:>10,} {t['acc']:>8.4f} {t['acc_norm']:>10.4f}")
    return "\n".join(lines)


def _mesh(text: str) -> tuple[int, int, int]:
    """``--mesh``: three sizes, each -1 or >= 1."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} must be three sizes DATA,FSDP,TENSOR, e.g. 1,1,8")
    return tuple(flag_type("-1 or int >= 1")(p.strip()) for p in parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the run's directory (config.json and checkpoints/)")
    p.add_argument("--step", type=flag_type("int >= 0"), default=None, help="the checkpoint's step (default: latest)")
    p.add_argument("--data", action="append", default=[],
                   help="a prepared data dir whose held-out split to score (repeatable; default: the run's)")
    p.add_argument("--tasks", action="append", default=[], help="a multiple-choice task file (jsonl; repeatable)")
    p.add_argument("--batches", type=flag_type("int >= 1"), default=None,
                   help="score only the first N held-out batches (default: the whole held-out split)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default <workdir>/evaluations/step_<N>.json)")
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="DATA,FSDP,TENSOR: evaluate on this mesh instead of the run's (one may be -1: the rest)")
    a = p.parse_args(argv)
    with user_errors():
        cfg = _saved_config(a.workdir)
        with cfg.unlocked():
            cfg.multiprocess = False  # one process evaluates
        setup_platform(cfg)
        result = evaluate(a.workdir, a.step, a.data, a.tasks, a.batches, a.mesh)
        out = a.json or join(a.workdir, "evaluations", f"step_{result['step']}.json")
        makedirs(os.path.dirname(out) or ".")
        write_text(out, json.dumps(result, indent=1))
    print(table(result) + f"\nwritten to {out}", flush=True)


if __name__ == "__main__":
    main()
