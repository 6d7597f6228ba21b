"""Train with learned-optimizer weights on held-out tasks and compare with AdamW; select and plot a
meta-training run's snapshots. The library behind ``python -m optim.learned.meta.evaluate`` and the run's own quick
validation (``optim.learned.meta.run``); see ``optim.learned.meta.evaluate`` for what the comparison does.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infra.files import write_atomic
from infra.metrics import read_metrics
from optim import registry
from optim.learned.meta import tasks as tasks_lib

CURVE_EVERY = 10
DEFAULT_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def learned_optimizer(variant: str, lr: float = 1e-3, mult_1d: float = 20.0, num_steps: int | None = None):
    """``theta -> optax transformation``: ``variant`` as a run builds it (its registry record's ``build``), from
    its default settings with this theta, at the constant ``lr``, without weight decay; ``mult_1d`` is the
    ``adam_lr_mult`` of variants whose settings have one. VeLO needs ``num_steps``."""
    spec = registry.meta_trainable(variant)
    settings = dict(spec.settings)
    if "adam_lr_mult" in settings:  # the harness's AdamW branch (celo2): the meta-training mult_1d
        settings["adam_lr_mult"] = mult_1d
    return lambda theta: spec.build(dict(settings, theta=theta), {"weight_decay": 0.0}, lr, num_steps)


def adamw(lr):
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def full_loss(task, params, data, chunk: int = 8192):
    """Mean cross-entropy over a whole split (in chunks, so memory stays small)."""
    x, y = data
    total = 0.0
    for i in range(0, y.shape[0], chunk):
        total = total + task.loss(params, (x[i:i + chunk], y[i:i + chunk])) * y[i:i + chunk].shape[0]
    return total / y.shape[0]


def make_trainer(task, make_opt, steps: int):
    """jit(fn(hp, key, train, test)) -> {curve, train_loss, test_loss}: ``steps`` steps of ``make_opt(hp)``.

    ``curve`` holds the minibatch training loss averaged over windows of CURVE_EVERY steps.
    """
    def run(hp, key, train, test):
        k_init, k_data = jax.random.split(key)
        params = task.init(k_init)
        opt = optax.with_extra_args_support(make_opt(hp))
        state = opt.init(params)

        def body(carry, k):
            params, state = carry
            loss, g = jax.value_and_grad(task.loss)(params, task.sample_batch(train, k))
            updates, state = opt.update(g, state, params, loss=loss)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(body, (params, state), jax.random.split(k_data, steps))
        curve = losses[: steps // CURVE_EVERY * CURVE_EVERY].reshape(-1, CURVE_EVERY).mean(-1)
        return {"curve": curve, "train_loss": full_loss(task, params, train),
                "test_loss": full_loss(task, params, test)}

    return run


@lru_cache(maxsize=None)
def _splits(dataset: str, cache_dir=None):
    train, test = tasks_lib.split(tasks_lib.load_dataset(dataset, cache_dir))
    return (jnp.asarray(train.x), jnp.asarray(train.y)), (jnp.asarray(test.x), jnp.asarray(test.y))


_COMPILED = {}


def evaluate_task(name: str, make_opt, hps, seeds: int, steps: int | None = None, cache_dir=None, opt_key=None):
    """Run ``make_opt(hp)`` for every hp in ``hps`` (a pytree with a leading axis) x seed on a validation task.

    Returns numpy arrays with leading axes [n_hp, seeds]. With ``opt_key`` (a name for ``make_opt``) the
    compiled function is cached, so repeated calls (e.g. monitoring a run) do not recompile.
    """
    task, default_steps = tasks_lib.VALID_TASKS[name]
    steps = steps or default_steps
    train, test = _splits(task.dataset, cache_dir)
    cache_key = (name, steps, opt_key)
    fn = _COMPILED.get(cache_key) if opt_key is not None else None
    if fn is None:
        run = make_trainer(task, make_opt, steps)
        fn = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, 0, None, None)), in_axes=(0, None, None, None)))
        if opt_key is not None:
            _COMPILED[cache_key] = fn
    keys = jax.random.split(jax.random.PRNGKey(1234), seeds)
    return jax.tree.map(np.asarray, fn(hps, keys, train, test))


def quick_validation(theta, variant: str, names=("fmnist_mlp32",), steps: int = 1000, cache_dir=None,
                     lr: float = 1e-3) -> dict:
    """Held-out loss (``valid/<task>``) and full training-split loss (``valid_train/<task>``) after training
    with ``theta`` for ``steps`` steps at ``lr`` (one seed), per task, for monitoring a run. Both matter: on
    small datasets (digits) a faster optimizer overfits sooner, so its held-out loss can rise while the
    training loss, the meta-objective's quantity, falls."""
    make = learned_optimizer(variant, lr, num_steps=steps)
    theta = jax.tree.map(lambda t: jnp.asarray(t)[None], theta)
    out = {}
    for n in names:
        res = evaluate_task(n, make, theta, 1, steps, cache_dir, opt_key=(variant, lr))
        out[f"valid/{n}"] = float(res["test_loss"][0, 0])
        out[f"valid_train/{n}"] = float(res["train_loss"][0, 0])
    return out


def adamw_baseline(name: str, seeds: int, lrs, cache_dir=None) -> dict:
    """The AdamW sweep on a validation task; it does not depend on theta, so it is cached on disk
    (``<cache>/meta_eval_adamw.json``, keyed by task, steps, seeds and lrs)."""
    path = pathlib.Path(cache_dir or tasks_lib.default_cache_dir()) / "meta_eval_adamw.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    key = f"{name}|{tasks_lib.VALID_TASKS[name][1]}|{seeds}|{','.join(f'{x:g}' for x in lrs)}"
    if key not in cache:
        out = evaluate_task(name, adamw, jnp.asarray(lrs, jnp.float32), seeds, cache_dir=cache_dir)
        cache = json.loads(path.read_text()) if path.exists() else {}
        cache[key] = {k: np.asarray(v).tolist() for k, v in out.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache).encode())
    return {k: np.asarray(v, np.float32) for k, v in cache[key].items()}


def _stats(x):
    return float(np.mean(x)), float(np.std(x))


def compare(theta_path, variant: str, names, seeds: int, lrs, cache_dir=None, lr: float = 1e-3,
            mult_1d: float = 20.0) -> dict:
    theta = jax.tree.map(jnp.asarray, registry.get(variant).weights.load(theta_path))
    results = {"theta": str(theta_path), "variant": variant, "seeds": seeds, "adamw_lrs": list(lrs),
               "learned_lr": lr, "mult_1d": mult_1d, "tasks": {}}
    for name in names:
        t0 = time.time()
        make = learned_optimizer(variant, lr, mult_1d, num_steps=tasks_lib.VALID_TASKS[name][1])
        lo = evaluate_task(name, make, jax.tree.map(lambda t: t[None], theta), seeds, cache_dir=cache_dir)
        ad = adamw_baseline(name, seeds, lrs, cache_dir)
        ad_test = np.nan_to_num(ad["test_loss"], nan=np.inf).mean(1)
        ad_train = np.nan_to_num(ad["train_loss"], nan=np.inf).mean(1)
        best, best_train = int(np.argmin(ad_test)), int(np.argmin(ad_train))
        row = {
            "steps": tasks_lib.VALID_TASKS[name][1],
            "learned": {"train_loss": _stats(lo["train_loss"][0]), "test_loss": _stats(lo["test_loss"][0]),
                        "curve": lo["curve"][0].mean(0).tolist()},
            "adamw_best_lr": float(lrs[best]),
            "adamw": {"train_loss": _stats(ad["train_loss"][best]), "test_loss": _stats(ad["test_loss"][best]),
                      "curve": ad["curve"][best].mean(0).tolist()},
            "adamw_sweep_test_loss": [float(v) for v in ad_test],
            "adamw_sweep_train_loss": [float(v) for v in ad_train],
            "adamw_best_train_lr": float(lrs[best_train]),
            "adamw_best_train_loss": _stats(ad["train_loss"][best_train]),
            "adamw_best_train_curve": ad["curve"][best_train].mean(0).tolist(),
        }
        row["learned_beats_adamw_test"] = row["learned"]["test_loss"][0] < row["adamw"]["test_loss"][0]
        row["learned_beats_adamw_train"] = row["learned"]["train_loss"][0] < row["adamw_best_train_loss"][0]
        results["tasks"][name] = row
        print(f"  {name}: done in {time.time() - t0:.0f}s", flush=True)
    rows = results["tasks"].values()
    results["wins_test"] = sum(r["learned_beats_adamw_test"] for r in rows)
    results["wins_train"] = sum(r["learned_beats_adamw_train"] for r in rows)
    results["mean_test_ratio"] = float(np.mean([r["learned"]["test_loss"][0] / r["adamw"]["test_loss"][0]
                                                for r in rows]))
    return results


def table(results) -> str:
    lines = [f"{'task':<20} {'steps':>5} | {results['variant'] + ' train':>17} {'held-out':>17} | "
             f"{'AdamW lr':>8} {'best train':>17} | {'AdamW lr':>8} {'best held-out':>17}"]
    for name, r in results["tasks"].items():
        f = lambda s: f"{s[0]:.4f} +- {s[1]:.4f}"
        lines.append(f"{name:<20} {r['steps']:>5} | {f(r['learned']['train_loss']):>17} "
                     f"{f(r['learned']['test_loss']):>17} | {r['adamw_best_train_lr']:>8.0e} "
                     f"{f(r['adamw_best_train_loss']):>17} | {r['adamw_best_lr']:>8.0e} "
                     f"{f(r['adamw']['test_loss']):>17}")
    lines.append(f"learned optimizer wins (held-out): {results['wins_test']}/{len(results['tasks'])}, "
                 f"(train): {results['wins_train']}/{len(results['tasks'])}; mean held-out loss ratio "
                 f"learned/AdamW = {results['mean_test_ratio']:.3f}  ({results['seeds']} seeds)")
    return "\n".join(lines)


def plot_compare(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["tasks"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = results["tasks"][name]
        curves = [(f"{results['variant']} (lr {results['learned_lr']:g}): train {r['learned']['train_loss'][0]:.3f}, "
                   f"held-out {r['learned']['test_loss'][0]:.3f}", r["learned"]["curve"], "-"),
                  (f"AdamW best held-out (lr {r['adamw_best_lr']:g}): held-out {r['adamw']['test_loss'][0]:.3f}",
                   r["adamw"]["curve"], "-")]
        if "adamw_best_train_curve" in r:  # the lr that the training-loss comparison uses
            curves.append((f"AdamW best train (lr {r['adamw_best_train_lr']:g}): train "
                           f"{r['adamw_best_train_loss'][0]:.3f}", r["adamw_best_train_curve"], "--"))
        for label, c, ls in curves:
            c = np.asarray(c)
            ax.plot(np.arange(1, len(c) + 1) * CURVE_EVERY, c, ls=ls, lw=1, label=label)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("train minibatch loss")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def select_snapshot(workdir, prefix: str = "valid_train/") -> pathlib.Path:
    """The snapshot ``theta_<i>.state`` of a run whose quick-validation row has the lowest mean of the
    metrics starting with ``prefix`` (the run's own validation, not the evaluation tables)."""
    workdir = pathlib.Path(workdir)
    scored = [(np.mean([v for k, v in r.items() if k.startswith(prefix)]), r["iteration"])
              for r in read_metrics(workdir, key="iteration") if any(k.startswith(prefix) for k in r)
              and (workdir / f"theta_{r['iteration']}.state").exists()]
    if not scored:
        raise SystemExit(f"{workdir}: no snapshot theta_<i>.state with a {prefix}* validation row "
                         "(run with --eval_every and --snapshot_every at a common multiple)")
    score, it = min(scored)
    print(f"selected {workdir / f'theta_{it}.state'}: mean {prefix}* = {score:.4f} "
          f"(of {len(scored)} validated snapshots)", flush=True)
    return workdir / f"theta_{it}.state"


def plot_objective(result, path):
    """``objective_curve``'s result -> PNG: each family's meta-objective relative to the first snapshot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ["mean", *result["families"]]:  # relative to the first snapshot: the changes are small
        v0 = rows[0][name]
        ax.plot([r["iteration"] for r in rows], [100 * (r[name] / v0 - 1) for r in rows], marker="o",
                label=f"{name} (first: {v0:.4f})", lw=2 if name == "mean" else 1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("outer iteration (snapshot)")
    n = result["problems_per_family"]
    ax.set_ylabel(f"meta-objective change from the first snapshot (%)\n"
                  f"(mean normalised training loss, {n} whole problems per family)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(workdir, path=None):
    """Meta-training objective and validation losses over a run -> ``<workdir>/meta_training.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(workdir, key="iteration")
    train = [r for r in rows if "mean_loss" in r]
    valid = [r for r in rows if any(k.startswith("valid") for k in r)]
    tasks = sorted({k.split("/", 1)[1] for r in valid for k in r if k.startswith("valid")})
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5.5 * (1 + len(tasks)), 4), squeeze=False)
    a = axes[0, 0]
    if train:
        it = np.array([r["iteration"] for r in train])
        a.plot(it, [r["mean_loss"] for r in train], alpha=0.4, label="mean meta-loss (window)")
        y = np.array([r["mean_loss"] for r in train])
        k = max(1, len(y) // 30)
        a.plot(it[k - 1:], np.convolve(y, np.ones(k) / k, "valid"), label=f"smoothed ({k} logs)")
        fams = sorted({k for r in train for k in r if k.endswith("/mean_loss") and k.startswith("family")})
        for f in fams:
            a.plot(it, [r.get(f, np.nan) for r in train], lw=0.6, alpha=0.5, label=f)
        a.legend(fontsize=7)
    a.set_xlabel("outer iteration")
    a.set_ylabel("normalised inner training loss (PES objective)")
    for b, task in zip(axes[0, 1:], tasks):  # one panel per task, each on its own (log) scale
        for kind, ls in (("valid", "-"), ("valid_train", "--")):
            pts = [(r["iteration"], r[f"{kind}/{task}"]) for r in valid if f"{kind}/{task}" in r]
            if pts:
                b.plot(*zip(*pts), marker="o", ms=3, ls=ls, label=f"{kind}/{task}")
        b.set_yscale("log")
        b.set_xlabel("outer iteration")
        b.set_ylabel("loss after training with theta")
        b.set_title(f"{task}: held-out (solid), training split (dashed)", fontsize=9)
        b.legend(fontsize=7)
    fig.tight_layout()
    path = path or pathlib.Path(workdir) / "meta_training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
