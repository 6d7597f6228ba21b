"""Evaluate meta-trained Celo2 / VeLO weights against AdamW on held-out validation tasks, and plot a run.

    python -m optim.learned.meta.evaluate --theta runs/meta_celo2/theta.state --variant celo2 --out runs/eval_celo2
    python -m optim.learned.meta.evaluate --theta runs/meta_velo/theta.state --variant velo --out runs/eval_velo
    python -m optim.learned.meta.evaluate --plot_run runs/meta_celo2
    python -m optim.learned.meta.evaluate --select runs/meta_celo2 --variant celo2 --out runs/eval_best
    python -m optim.learned.meta.evaluate --objective runs/meta_celo2 --snapshots 0,5000,10000

``--objective`` measures a run's meta-objective itself on its snapshots (``--snapshots``): every snapshot
trains the same ``--problems`` whole inner problems per task family (same lengths, reparam scales, inits
and batches), so the curve shows what the truncated PES estimates cannot; writes
``<workdir>/meta_objective.json`` and ``.png``.

``--select`` picks the run's snapshot (``theta_<i>.state``) with the lowest mean quick-validation training
loss (``valid_train/*``, logged every ``--eval_every`` iterations during the run) and evaluates it.

The learned optimizer is used as deployed, as its registry record builds it (``optim.learned.celo2.celo2`` /
``celo2_base`` / ``optim.learned.velo.velo``), at one constant lr (``--lr``: the ``step_mult`` it was
meta-trained with, by default 1e-3 for Celo2 with mult_1d 20, and 1 for VeLO, whose lr multiplies its own
step and which is told each task's number of steps), no tuning and no reparametrisation. AdamW (b1 0.9,
b2 0.999, eps 1e-8, no weight decay, constant lr) is swept over ``--lrs`` and compared at its best lr per task
and criterion: the lr with the lowest mean held-out loss for the held-out comparison, the lr with the lowest
mean final training loss for the training-loss comparison.
Every task trains on the first 80% of its dataset and reports the full train-split loss and the held-out
(last 20%) loss after its number of steps, mean +- std over seeds. Writes ``eval.json`` and ``eval.png``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from infra.cli import user_errors
from infra.files import write_atomic
from infra.ranges import flag_type
from optim import registry
from optim.learned.meta import pes, run
from optim.learned.meta import tasks as tasks_lib
from optim.learned.meta.validation import (DEFAULT_LRS, compare, plot_compare, plot_objective, plot_run,
                                           select_snapshot,
                                   table)


def objective_curve(workdir, iterations, num_problems: int = 64, seed: int = 0) -> dict:
    """``pes.meta_objective`` of the run's snapshots ``theta_<i>.state``, with the run's own task families,
    inner optimizer, lengths and reparam range -> ``<workdir>/meta_objective.json`` and ``.png``."""
    workdir = pathlib.Path(workdir)
    args = run.saved_args(workdir)
    problems, datas, *_ = run.build(args)
    load = registry.get(args.variant).weights.load
    fn = jax.jit(lambda theta: pes.meta_objective(theta, problems, datas, jax.random.PRNGKey(seed),
                                                  num_problems, args.max_unroll))
    families = [t for t in args.tasks.split(",") if t]
    rows = []
    for it in iterations:
        t0 = time.time()
        values = np.asarray(fn(jax.tree.map(jnp.asarray, load(workdir / f"theta_{it}.state"))))
        rows.append({"iteration": it, "mean": float(values.mean()), **dict(zip(families, map(float, values)))})
        print(f"  theta_{it}: meta-objective {rows[-1]['mean']:.4f} "
              f"({', '.join(f'{n} {v:.4f}' for n, v in zip(families, values))}; {time.time() - t0:.0f}s)", flush=True)
    result = {"problems_per_family": num_problems, "seed": seed, "families": families, "rows": rows}
    write_atomic(workdir / "meta_objective.json", json.dumps(result, indent=1).encode())
    plot_objective(result, workdir / "meta_objective.png")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m optim.learned.meta.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theta", help="weight file to evaluate (theta.state, or a VeLO parameter file)")
    p.add_argument("--variant", default="celo2", choices=list(registry.META_TRAINABLE))
    p.add_argument("--out", help="output directory for eval.json / eval.png (default: next to --theta)")
    p.add_argument("--tasks", default=",".join(tasks_lib.VALID_TASKS), help="comma-separated validation tasks")
    p.add_argument("--seeds", type=flag_type("int >= 1"), default=3)
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS), help="AdamW lrs to sweep")
    p.add_argument("--lr", type=flag_type("float > 0"), default=None,
                   help="the learned optimizer's lr, its meta-training step_mult (default 1e-3; velo: 1)")
    p.add_argument("--mult_1d", type=flag_type("float > 0"), default=20.0, help="bias lr multiplier (celo2)")
    p.add_argument("--plot_run", help="a meta-training workdir: plot its objective and validation losses")
    p.add_argument("--objective", help="a meta-training workdir: measure the meta-objective of its --snapshots")
    p.add_argument("--snapshots", default="0", help="comma-separated snapshot iterations for --objective")
    p.add_argument("--problems", type=flag_type("int >= 1"), default=64,
                   help="whole inner problems per family for --objective")
    p.add_argument("--select", help="a meta-training workdir: evaluate its snapshot with the lowest quick-"
                                    "validation training loss (instead of --theta)")
    p.add_argument("--cache_dir", default=None)
    args = p.parse_args(argv)
    if args.plot_run:
        print("wrote", plot_run(args.plot_run))
    if args.objective:
        objective_curve(args.objective, [int(x) for x in args.snapshots.split(",")], args.problems)
    if args.select:
        args.theta = str(select_snapshot(args.select))
    if args.theta:
        out = pathlib.Path(args.out or pathlib.Path(args.theta).parent)
        out.mkdir(parents=True, exist_ok=True)
        lrs = [float(x) for x in args.lrs.split(",")]
        lr = registry.get(args.variant).meta.step_mult if args.lr is None else args.lr
        res = compare(args.theta, args.variant, [t for t in args.tasks.split(",") if t], args.seeds, lrs,
                      args.cache_dir, lr, args.mult_1d)
        print(table(res))
        (out / "eval.json").write_text(json.dumps(res, indent=1))
        plot_compare(res, out / "eval.png")
        print("wrote", out / "eval.json", out / "eval.png")
    if not (args.theta or args.plot_run or args.objective):
        p.error("give --theta, --select, --objective and/or --plot_run")


if __name__ == "__main__":
    with user_errors():
        main()
