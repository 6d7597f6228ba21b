"""Meta-train Celo2 / Celo2-base / VeLO with PES (docs/meta_training.md#running-it): the resumable outer
loop.

    python -m optim.learned.meta --variant celo2 --workdir runs/meta_celo2 --outer_iterations 10000
    python -m optim.learned.meta --variant velo --workdir runs/meta_velo --outer_iterations 10000

The workdir receives ``config.json``, ``metrics.jsonl`` (one row per log: iteration, mean_loss = mean
meta-loss over the window, per-family metrics, throughput; validation rows carry ``valid/*``),
``tensorboard/``, ``checkpoints/`` (orbax, as the trainer's: the whole PES state: theta, outer AdamW state,
accumulators, inner problems, RNG, iteration; with the config and the wall time so far), ``theta_{i}.state`` snapshots
(``theta_0``: the starting theta) and the final ``theta.state`` (the variant's official format: Celo2
``theta.state`` or the VeLO parameter file). Starting on a workdir with a checkpoint resumes it exactly.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infra.checkpoint import Checkpointer
from infra.files import write_atomic
from infra.metrics import MetricsLogger
from infra.preemption import StopRequest
from infra.ranges import flag_type
from optim import registry
from optim.learned.meta import inner as inner_lib
from optim.learned.meta import pes
from optim.learned.meta import tasks as tasks_lib
from optim.learned.meta.validation import plot_run, quick_validation

# Options that must not change when a run resumes (the others, e.g. --outer_iterations, may).
FIXED = ("variant", "num_particles", "trunc_length", "min_unroll", "max_unroll", "reparam_range", "outer_lr", "std",
         "step_mult", "mult_1d", "seed", "tasks", "regex_1d", "init", "init_theta")


_ADAM_1D = [name for name in registry.META_TRAINABLE if registry.get(name).meta.adam_1d]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optim.learned.meta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="celo2", choices=list(registry.META_TRAINABLE))
    p.add_argument("--workdir", required=True)
    p.add_argument("--outer_iterations", type=flag_type("int >= 1"), default=100_000, help="total outer updates")
    p.add_argument("--num_particles", type=flag_type("int >= 1"), default=8,
                   help="PES particles per task family (x2 antithetic)")
    p.add_argument("--trunc_length", type=flag_type("int >= 1"), default=50, help="inner steps per truncation")
    p.add_argument("--min_unroll", type=flag_type("int >= 1"), default=100)
    p.add_argument("--max_unroll", type=flag_type("int >= 1"), default=2000)
    p.add_argument("--reparam_range", default="1e-3,1e3",
                   help="global reparametrisation scales s ~ log-uniform(lo, hi) (the paper's: 1e-3,1e3; "
                        "docs/meta_training.md#task-augmentation)")
    p.add_argument("--outer_lr", type=flag_type("float > 0"), default=None, help="default: " + ", ".join(
        f"{registry.get(name).meta.outer_lr:g} ({name})" for name in registry.META_TRAINABLE))
    p.add_argument("--std", type=flag_type("float > 0"), default=0.01, help="PES perturbation std")
    p.add_argument("--step_mult", type=flag_type("float > 0"), default=None,
                   help="inner lr of the learned rule (for VeLO the multiplier of its own step); default: " + ", ".join(
                       f"{registry.get(name).meta.step_mult:g} ({name})" for name in registry.META_TRAINABLE))
    p.add_argument("--mult_1d", type=flag_type("float > 0"), default=20.0,
                   help="bias lr multiplier (variants that route biases to Adam: " + ", ".join(_ADAM_1D) + ")")
    p.add_argument("--regex_1d", default=r"/b$", help="leaves routed to Adam (" + ", ".join(_ADAM_1D) + ")")
    p.add_argument("--seed", type=flag_type("int >= 0"), default=0)
    p.add_argument("--init", default="random", choices=("random", "rule"),
                   help="theta to start from: 'random' (the paper's Haiku init) or 'rule', a hand-designed rule "
                        "with the rest of the MLP random (" + "; ".join(
                            f"{name}: {registry.get(name).meta.rule_doc}" for name in registry.META_TRAINABLE
                            if registry.get(name).meta.rule_init is not None) + "; no other variant has one)")
    p.add_argument("--init_theta", default="", help="start from this weight file (e.g. shipped weights) "
                                                    "instead of --init")
    p.add_argument("--tasks", default=",".join(tasks_lib.TRAIN_TASKS), help="task families (comma-separated)")
    p.add_argument("--log_every", type=flag_type("int >= 1"), default=10)
    p.add_argument("--checkpoint_every", type=flag_type("int >= 1"), default=100)
    p.add_argument("--snapshot_every", type=flag_type("int >= 1"), default=1000,
                   help="theta_{i}.state every this many updates")
    p.add_argument("--eval_every", type=flag_type("int >= 0"), default=250, help="quick held-out validation (0: off)")
    p.add_argument("--eval_steps", type=flag_type("int >= 1"), default=1000)
    p.add_argument("--max_minutes", type=flag_type("float >= 0"), default=0.0,
                   help="stop cleanly after this wall time (0: off)")
    p.add_argument("--cache_dir", default=None, help="data cache (default $CELO2_HARNESS_CACHE or "
                                                     "~/.cache/celo2_harness)")
    p.add_argument("--no_progress", action="store_true")
    return p


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
    spec = registry.get(args.variant)
    if args.init_theta:
        theta = jax.tree.map(jnp.asarray, spec.weights.load(args.init_theta))
    elif args.init == "rule":
        if spec.meta.rule_init is None:
            raise SystemExit(f"--init rule: {args.variant} has no hand-designed rule to start from; use --init random")
        theta = spec.meta.rule_init(rng)
    else:
        theta = spec.meta.init(rng)
    state = pes.init(jax.random.fold_in(rng, 1), theta, outer_opt, problems, args.num_particles)
    return problems, datas, outer_opt, state, step


def _resolve(args):
    meta = registry.get(args.variant).meta
    if args.outer_lr is None:
        args.outer_lr = meta.outer_lr
    if args.step_mult is None:
        args.step_mult = meta.step_mult
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


def _start(args, workdir: pathlib.Path, config: dict, datas):
    """(problems, datas, step_fn, state, checkpointer, start iteration, wall seconds before this session)."""
    if (workdir / "checkpoint.npz").exists():
        raise SystemExit(f"{workdir} holds a meta-training checkpoint of the old npz format (checkpoint.npz); "
                         "this version checkpoints with orbax: start a new --workdir (its theta_<i>.state "
                         "snapshots still load with --init_theta)")
    cfg_path = workdir / "config.json"
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=2, async_save=False)
    if ckpt.steps() and cfg_path.exists():
        old = vars(saved_args(workdir))
        changed = {k: (old[k], config[k]) for k in FIXED if old[k] != config[k]}
        if changed:
            raise SystemExit(f"{workdir} holds a run with a different config: {changed}")
    write_atomic(cfg_path, json.dumps(config, indent=1).encode())
    problems, datas, _, state, step = build(args, datas)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    start, restored = ckpt.restore_latest(abstract)
    if restored is None:
        return problems, datas, step, state, ckpt, 0, 0.0
    print(f"resuming {workdir} at iteration {start}", flush=True)
    _truncate_metrics(workdir / "metrics.jsonl", start)
    return problems, datas, step, restored, ckpt, start, float(ckpt.meta(start).get("wall_s", 0.0))


def main(argv=None, datas=None):
    args = _resolve(parser().parse_args(argv))
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python -m optim.learned.meta " + " ".join(sys.argv[1:] if argv is None else argv)
    config = dict(vars(args), command=command)
    problems, datas, step, state, ckpt, start, wall_before = _start(args, workdir, config, datas)
    if registry.get(args.variant).meta.adam_1d:  # the routing of the meta-training Adam
        labels = inner_lib.regex_labels(args.regex_1d)(problems[0].task.init(jax.random.PRNGKey(0)))
        print("routing (meta-training):", {inner_lib.path_str(p): l
                                           for p, l in jax.tree_util.tree_leaves_with_path(labels)}, flush=True)
    log = MetricsLogger(str(workdir), args.outer_iterations, start, key="iteration", desc="meta",
                        progress=not args.no_progress)
    loop = OuterLoop(args, workdir, step, log, ckpt, config, wall_before,
                     args.num_particles * 2 * len(problems) * args.trunc_length)
    state, it = loop.run(state, datas, start)
    log.close()
    plot_run(workdir)  # meta_training.png: the objective and the validation losses over the run
    print(f"stopped at iteration {it}; wrote {workdir / 'theta.state'}", flush=True)
    return state


class OuterLoop:
    """PES outer iterations with logging (throughput over windows that exclude validation), quick
    validation, theta snapshots and orbax checkpoints; stops at ``--outer_iterations``, after
    ``--max_minutes``, or on SIGTERM/SIGINT (finishing the iteration and checkpointing)."""

    def __init__(self, args, workdir, step, log, ckpt, config, wall_before, inner_per_iter):
        self.args, self.workdir, self.step, self.log, self.ckpt = args, workdir, step, log, ckpt
        self.config, self.wall_before, self.inner_per_iter = config, wall_before, inner_per_iter
        self.save_theta = registry.get(args.variant).weights.save
        self.t_start = time.time()
        self.window, self.t_window, self.it_window = [], time.time(), 0

    def wall(self) -> float:
        return self.wall_before + time.time() - self.t_start

    def validate(self, state, iteration):
        t0 = time.time()
        self.log.write(iteration, quick_validation(state.theta, self.args.variant, ("fmnist_mlp32", "digits_mlp32"),
                                                   self.args.eval_steps, self.args.cache_dir, lr=self.args.step_mult))
        self.t_window += time.time() - t0  # keep validation out of the throughput numbers

    def log_window(self, it):
        ms = jax.device_get(self.window)
        dt = time.time() - self.t_window
        row = {**{k: float(np.mean([x[k] for x in ms])) for k in ms[0]},
               "outer_its_per_s": (it - self.it_window) / dt,
               "inner_steps_per_s": (it - self.it_window) * self.inner_per_iter / dt, "wall_s": self.wall()}
        self.log.write(it, row)
        self.log.progress(it, loss=f"{row['mean_loss']:.3f}", inner_steps_s=f"{row['inner_steps_per_s']:.0f}")
        self.window, self.t_window, self.it_window = [], time.time(), it

    def checkpoint(self, state, it):
        self.ckpt.save(it, state, config=self.config, extra_meta={"wall_s": self.wall()})

    def run(self, state, datas, it: int):
        args = self.args
        self.it_window = it
        if it == 0:  # the starting theta and its scores: what the run improves on
            if args.snapshot_every:
                self.save_theta(self.workdir / "theta_0.state", jax.device_get(state.theta))
            if args.eval_every:
                self.validate(state, 0)
        with StopRequest() as stop:
            while it < args.outer_iterations and not stop.requested:
                state, m = self.step(state, datas)
                it += 1
                self.window.append(m)
                if it % args.log_every == 0 or it == args.outer_iterations:
                    self.log_window(it)
                if args.eval_every and it % args.eval_every == 0:
                    self.validate(state, it)
                if args.snapshot_every and it % args.snapshot_every == 0:
                    self.save_theta(self.workdir / f"theta_{it}.state", jax.device_get(state.theta))
                if it % args.checkpoint_every == 0:
                    self.checkpoint(state, it)
                if args.max_minutes and time.time() - self.t_start > 60 * args.max_minutes:
                    break
        if it not in self.ckpt.steps():
            self.checkpoint(state, it)
        self.ckpt.close()
        self.save_theta(self.workdir / "theta.state", jax.device_get(state.theta))
        return state, it
