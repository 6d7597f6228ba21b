"""Meta-train Celo2 / Celo2-base / VeLO with PES (spec D): the resumable outer loop.

    python -m optim.meta --variant celo2 --workdir runs/meta_celo2 --outer_iterations 10000
    python -m optim.meta --variant velo --workdir runs/meta_velo --outer_iterations 10000

The workdir receives ``config.json``, ``metrics.jsonl`` (one row per log: iteration, mean_loss = mean
meta-loss over the window, per-family metrics, throughput; validation rows carry ``valid/*``),
``tensorboard/``, ``checkpoint.npz`` + ``checkpoint.json`` (the whole PES state: theta, outer AdamW state,
accumulators, inner problems, RNG, iteration; written atomically), ``theta_{i}.state`` snapshots
(``theta_0``: the starting theta) and the final ``theta.state`` (the variant's official format: Celo2
``theta.state`` or the VeLO parameter file). Starting on a workdir with a checkpoint resumes it exactly.
"""
from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim.meta import inner as inner_lib
from optim.meta import pes
from optim.meta import tasks as tasks_lib
from infra.files import write_atomic
from infra.preemption import StopRequest

CKPT = "checkpoint.npz"
CKPT_META = "checkpoint.json"
# Options that must not change when a run resumes (the others, e.g. --outer_iterations, may).
FIXED = ("variant", "num_particles", "trunc_length", "min_unroll", "max_unroll", "reparam_range", "outer_lr", "std",
         "step_mult", "mult_1d", "seed", "tasks", "regex_1d", "init", "init_theta")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optim.meta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="celo2", choices=list(inner_lib.VARIANTS))
    p.add_argument("--workdir", required=True)
    p.add_argument("--outer_iterations", type=int, default=100_000, help="total outer updates")
    p.add_argument("--num_particles", type=int, default=8, help="PES particles per task family (x2 antithetic)")
    p.add_argument("--trunc_length", type=int, default=50, help="inner steps per truncation")
    p.add_argument("--min_unroll", type=int, default=100)
    p.add_argument("--max_unroll", type=int, default=2000)
    p.add_argument("--reparam_range", default="1e-3,1e3",
                   help="global reparametrisation scales s ~ log-uniform(lo, hi) (spec D.3: 1e-3,1e3)")
    p.add_argument("--outer_lr", type=float, default=None, help="default: " + ", ".join(
        f"{v.outer_lr:g} ({name})" for name, v in inner_lib.VARIANTS.items()))
    p.add_argument("--std", type=float, default=0.01, help="PES perturbation std")
    p.add_argument("--step_mult", type=float, default=None, help="inner lr of the learned rule (default 1e-3; "
                                                                   "velo: 1, the multiplier of its own step)")
    p.add_argument("--mult_1d", type=float, default=20.0, help="bias lr multiplier (celo2 only)")
    p.add_argument("--regex_1d", default=r"/b$", help="leaves routed to Adam (celo2 only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="random", choices=("random", "rule"),
                   help="theta to start from: 'random' (the paper's Haiku init) or 'rule', a hand-designed rule "
                        "with the rest of the MLP random (celo2: d = momentum 0.9, i.e. Muon's direction after "
                        "Newton-Schulz; celo2-base: d = m / sqrt(v), Adam's direction; not for velo)")
    p.add_argument("--init_theta", default="", help="start from this weight file (e.g. shipped weights) "
                                                    "instead of --init")
    p.add_argument("--tasks", default=",".join(tasks_lib.TRAIN_TASKS), help="task families (comma-separated)")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--checkpoint_every", type=int, default=100)
    p.add_argument("--snapshot_every", type=int, default=1000, help="theta_{i}.state every this many updates")
    p.add_argument("--eval_every", type=int, default=250, help="quick held-out validation (0: off)")
    p.add_argument("--eval_steps", type=int, default=1000)
    p.add_argument("--max_minutes", type=float, default=0.0, help="stop cleanly after this wall time (0: off)")
    p.add_argument("--cache_dir", default=None, help="data cache (default $CELO2_HARNESS_CACHE or "
                                                     "~/.cache/celo2_harness)")
    p.add_argument("--no_progress", action="store_true")
    return p


def save_checkpoint(workdir: pathlib.Path, state: pes.PESState, meta: dict):
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(x) for x in jax.tree.leaves(state)])
    write_atomic(workdir / CKPT, buf.getvalue())
    write_atomic(workdir / CKPT_META, json.dumps(meta, indent=1).encode())


def load_checkpoint(workdir: pathlib.Path, template: pes.PESState):
    with np.load(workdir / CKPT) as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    treedef = jax.tree.structure(template)
    ref = jax.tree.leaves(template)
    if len(leaves) != len(ref) or any(a.shape != b.shape for a, b in zip(leaves, ref)):
        raise ValueError(f"{workdir / CKPT} does not match this configuration's state")
    state = treedef.unflatten([jnp.asarray(a, b.dtype) for a, b in zip(leaves, ref)])
    return state, json.loads((workdir / CKPT_META).read_text())


_BUILT = {}  # config -> (problems, outer_opt, jitted step): runs in one process share the compiled step


def build(args, datas=None):
    """(problems, datas, outer_opt, init_state, step_fn) for a config. ``datas`` overrides the datasets."""
    names = [t for t in args.tasks.split(",") if t]
    reparam_range = tuple(float(x) for x in args.reparam_range.split(","))
    key = (args.variant, args.step_mult, args.mult_1d, args.regex_1d, args.min_unroll, args.max_unroll,
           reparam_range, tuple(names), args.outer_lr, args.trunc_length, args.std)
    if key not in _BUILT:
        make_opt = inner_lib.meta_training_optimizer(args.variant, args.step_mult, args.mult_1d, args.regex_1d)
        problems = [inner_lib.TruncatedProblem(tasks_lib.TRAIN_TASKS[n], make_opt, args.min_unroll,
                                               args.max_unroll, reparam_range) for n in names]
        outer_opt = optax.adamw(args.outer_lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
        step = jax.jit(partial(pes.step, problems=problems, outer_opt=outer_opt, trunc_length=args.trunc_length,
                               std=args.std), donate_argnums=0)
        _BUILT[key] = (problems, outer_opt, step)
    problems, outer_opt, step = _BUILT[key]
    if datas is None:
        datas = []
        for n in names:
            train, _ = tasks_lib.split(tasks_lib.load_dataset(tasks_lib.TRAIN_TASKS[n].dataset, args.cache_dir))
            datas.append((jnp.asarray(train.x), jnp.asarray(train.y)))
    rng = jax.random.PRNGKey(args.seed)
    variant = inner_lib.VARIANTS[args.variant]
    if args.init_theta:
        theta = jax.tree.map(jnp.asarray, variant.load(args.init_theta))
    elif args.init == "rule":
        if variant.rule_init is None:
            raise SystemExit(f"--init rule: {args.variant} has no hand-designed rule to start from; use --init random")
        theta = variant.rule_init(rng)
    else:
        theta = variant.init(rng)
    state = pes.init(jax.random.fold_in(rng, 1), theta, outer_opt, problems, args.num_particles)
    return problems, datas, outer_opt, state, step


def _resolve(args):
    variant = inner_lib.VARIANTS[args.variant]
    if args.outer_lr is None:
        args.outer_lr = variant.outer_lr
    if args.step_mult is None:
        args.step_mult = variant.step_mult
    return args


def saved_args(workdir) -> argparse.Namespace:
    """The options of the run in ``workdir`` (its ``config.json``), with today's defaults for options newer
    than the run."""
    workdir = pathlib.Path(workdir)
    args = parser().parse_args(["--workdir", str(workdir)])
    saved = json.loads((workdir / "config.json").read_text())
    vars(args).update({k: v for k, v in saved.items() if k != "command"})
    return args


def _truncate_metrics(path: pathlib.Path, iteration: int):
    """Drop rows logged after the checkpoint we resume from, so the file matches the resumed run."""
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["iteration"] <= iteration]
        write_atomic(path, "".join(r + "\n" for r in rows).encode())


def main(argv=None, datas=None):
    args = _resolve(parser().parse_args(argv))
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config["command"] = "python -m optim.meta " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg_path = workdir / "config.json"
    if (workdir / CKPT).exists() and cfg_path.exists():
        old = vars(saved_args(workdir))
        changed = {k: (old[k], config[k]) for k in FIXED if old[k] != config[k]}
        if changed:
            raise SystemExit(f"{workdir} holds a run with a different config: {changed}")
    cfg_path.write_text(json.dumps(config, indent=1))

    problems, datas, outer_opt, state, step = build(args, datas)
    save_theta = inner_lib.VARIANTS[args.variant].save
    wall_before, start = 0.0, 0
    if (workdir / CKPT).exists():
        state, meta = load_checkpoint(workdir, state)
        start, wall_before = int(state.iteration), float(meta.get("wall_s", 0.0))
        print(f"resuming {workdir} at iteration {start}", flush=True)
        _truncate_metrics(workdir / "metrics.jsonl", start)
    if args.variant == "celo2":
        labels = inner_lib.regex_labels(args.regex_1d)(problems[0].task.init(jax.random.PRNGKey(0)))
        print("routing (meta-training):", {inner_lib.path_str(p): l
                                           for p, l in jax.tree_util.tree_leaves_with_path(labels)}, flush=True)

    from tensorboardX import SummaryWriter
    from tqdm import tqdm
    tb = SummaryWriter(str(workdir / "tensorboard"))
    metrics_file = open(workdir / "metrics.jsonl", "a")
    inner_per_iter = args.num_particles * 2 * len(problems) * args.trunc_length

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for k, v in row.items():
            if k != "iteration" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["iteration"])
        tb.flush()

    def checkpoint(it):
        save_checkpoint(workdir, state, {"iteration": it, "wall_s": wall_before + time.time() - t_start,
                                         "config": config})

    t_start = time.time()
    window, t_window, it_window = [], time.time(), start
    bar = tqdm(total=args.outer_iterations, initial=start, unit="it", disable=args.no_progress,
               dynamic_ncols=True, smoothing=0.05)
    it = start

    def validate(iteration):
        nonlocal t_window
        from optim.meta.evaluate import quick_validation
        t0 = time.time()
        log({"iteration": iteration, **quick_validation(state.theta, args.variant, ("fmnist_mlp32", "digits_mlp32"),
                                                        args.eval_steps, args.cache_dir, lr=args.step_mult)})
        t_window += time.time() - t0  # keep validation out of the throughput numbers

    if start == 0:  # the starting theta and its scores: what the run improves on
        if args.snapshot_every:
            save_theta(workdir / "theta_0.state", jax.device_get(state.theta))
        if args.eval_every:
            validate(0)
    with StopRequest() as stop:  # SIGTERM/SIGINT: finish this iteration, checkpoint, exit
        while it < args.outer_iterations and not stop.requested:
            state, m = step(state, datas)
            it += 1
            window.append(m)
            bar.update(1)
            if it % args.log_every == 0 or it == args.outer_iterations:
                ms = jax.device_get(window)
                dt = time.time() - t_window
                row = {"iteration": it, **{k: float(np.mean([x[k] for x in ms])) for k in ms[0]},
                       "outer_its_per_s": (it - it_window) / dt,
                       "inner_steps_per_s": (it - it_window) * inner_per_iter / dt,
                       "wall_s": wall_before + time.time() - t_start}
                log(row)
                bar.set_postfix(loss=f"{row['mean_loss']:.3f}", inner_steps_s=f"{row['inner_steps_per_s']:.0f}")
                window, t_window, it_window = [], time.time(), it
            if args.eval_every and it % args.eval_every == 0:
                validate(it)
            if args.snapshot_every and it % args.snapshot_every == 0:
                save_theta(workdir / f"theta_{it}.state", jax.device_get(state.theta))
            if it % args.checkpoint_every == 0:
                checkpoint(it)
            if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
                break
    bar.close()
    checkpoint(it)
    save_theta(workdir / "theta.state", jax.device_get(state.theta))
    metrics_file.close()
    tb.close()
    from optim.meta.evaluate import plot_run
    plot_run(workdir)  # meta_training.png: the objective and the validation losses over the run
    print(f"stopped at iteration {it}; wrote {workdir / 'theta.state'}", flush=True)
    return state
