"""Ship a meta-trained theta as the variant's weights (its registry record's ``weights.shipped``,
``optim/learned/weights/<variant>.state``; docs/learned_optimizers.md#shipped-weights) with a JSON record of how it
was made.

    python -m optim.learned.meta.ship --workdir runs/meta_celo2 --eval runs/eval_celo2/eval.json [--theta FILE]

The run's ``meta_training.png`` and ``meta_objective.png`` (``evaluate --objective``) and the evaluation's
``eval.png`` (next to ``--eval``) are copied too, as ``<variant>-meta-training.png``,
``<variant>-meta-objective.png`` and ``<variant>-eval.png``; ``meta_objective.json`` goes into the record.

The JSON (``optim/learned/weights/<variant>.json``) records the meta-training command and config, the outer
iterations and wall time behind the weights, the measured throughput (inner steps/s and the ratio to the
paper's ~20K/s on an A100), and the validation comparison against AdamW, including whether the weights beat
it on final training loss (the meta-objective's quantity) and on held-out loss. ``--start_eval`` adds the
same comparison for the theta the run started from (``theta_0.state``), so the record shows what
meta-training added. ``--note`` adds free text (e.g. what limited the result).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np

from infra.checkpoint import Checkpointer
from infra.cli import user_errors
from infra.metrics import read_metrics
from optim import registry

PAPER_INNER_STEPS_PER_S = 3.2e8 / (4.5 * 3600)  # 100K outer iterations x 3,200 inner steps in 4.5 GPU-hours


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optim.learned.meta.ship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--eval", required=True, help="eval.json written by python -m optim.learned.meta.evaluate")
    p.add_argument("--theta", default=None, help="default <workdir>/theta.state")
    p.add_argument("--dest", default=None, help="default: the directory of the variant's shipped weights "
                                                "(optim/learned/weights)")
    p.add_argument("--start_eval", default=None, help="eval.json of the run's starting theta (theta_0.state)")
    p.add_argument("--note", default="")
    return p


def _throughput(rows) -> dict:
    rates = [r["inner_steps_per_s"] for r in rows[1:]] or [np.nan]  # the first window includes compilation
    return {
        "inner_steps_per_s_median": float(np.nanmedian(rates)),
        "inner_steps_per_s_max": float(np.nanmax(rates)),
        "paper_inner_steps_per_s": PAPER_INNER_STEPS_PER_S,
        "ratio_to_paper_median": float(np.nanmedian(rates) / PAPER_INNER_STEPS_PER_S),
        "machine": "2 shared CPU cores (XLA CPU), no accelerator",
    }


def _drop_curves(record: dict) -> None:
    """Curves belong in the eval.json, not in the record."""
    for key in ("validation", "start_validation"):
        for r in record.get(key, {}).get("tasks", {}).values():
            r["learned"].pop("curve", None)
            r["adamw"].pop("curve", None)
            r.pop("adamw_best_train_curve", None)


def make_record(args, workdir: pathlib.Path, config: dict, theta_path: pathlib.Path) -> dict:
    """The JSON record of the weights at ``theta_path`` from the run in ``workdir`` (module docstring)."""
    rows = [r for r in read_metrics(workdir, key="iteration") if "inner_steps_per_s" in r]
    ev = json.loads(pathlib.Path(args.eval).read_text())
    checkpoints = Checkpointer(str(workdir / "checkpoints"))
    run_iterations = iteration = checkpoints.steps()[-1]
    wall_s = checkpoints.meta(run_iterations).get("wall_s")
    checkpoints.close()
    if theta_path.name.startswith("theta_"):
        iteration = int(theta_path.stem.split("_")[1])
    per_iteration = config["num_particles"] * 2 * len(config["tasks"].split(",")) * config["trunc_length"]
    record = {
        "variant": config["variant"],
        "command": config.get("command"),
        "config": {k: v for k, v in config.items() if k != "command"},
        "outer_iterations": iteration,  # behind the shipped theta (a snapshot may come before the run's end)
        "inner_steps": iteration * per_iteration,
        "run_outer_iterations": run_iterations,  # the whole run, which wall_time_s measures
        "run_inner_steps": run_iterations * per_iteration,
        "wall_time_s": wall_s,
        "throughput": _throughput(rows),
        "paper_outer_iterations": 100_001,
        "validation": ev,
        "beats_adamw_train_on_all_tasks": ev["wins_train"] == len(ev["tasks"]),
        "beats_adamw_heldout_on_all_tasks": ev["wins_test"] == len(ev["tasks"]),
        "note": args.note,
    }
    if (workdir / "meta_objective.json").exists():
        record["meta_objective"] = json.loads((workdir / "meta_objective.json").read_text())
    if args.start_eval:
        record["start_validation"] = json.loads(pathlib.Path(args.start_eval).read_text())
    _drop_curves(record)
    return record


def main(argv=None):
    args = _parser().parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    config = json.loads((workdir / "config.json").read_text())
    theta_path = pathlib.Path(args.theta) if args.theta else workdir / "theta.state"
    weights = registry.get(config["variant"]).weights
    weights.load(theta_path)  # validate
    record = make_record(args, workdir, config, theta_path)
    dest = pathlib.Path(args.dest) if args.dest else weights.shipped.parent
    stem = weights.shipped.stem  # the shipped file's name, in another directory with --dest
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(theta_path, dest / f"{stem}.state")
    (dest / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    plots = {"meta-training": workdir / "meta_training.png", "meta-objective": workdir / "meta_objective.png",
             "eval": pathlib.Path(args.eval).with_name("eval.png")}
    for name, src in plots.items():
        if src.exists():
            shutil.copyfile(src, dest / f"{stem}-{name}.png")
    print(f"wrote {dest / (stem + '.state')} and {dest / (stem + '.json')}")


if __name__ == "__main__":
    with user_errors():
        main()
