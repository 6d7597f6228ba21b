"""``python -m tools.compare --config configs/compare_cpu.py``: which optimizer trains this model best
for this token budget?

Every optimizer in ``compare.optimizers`` trains the same model on the same data for the same steps.
1. Sweep: seed 0 at every peak learning rate in ``compare.lrs[<optimizer>]``.
2. Seeds: the rate with the lowest final held-out loss is rerun with seeds 1 .. ``compare.seeds``-1.
   Seed s gives every optimizer the same initial weights and the same data order.
Each run is an ordinary training run in ``<workdir>/runs/<optimizer>_lr<lr>_s<seed>/`` (metrics.jsonl,
TensorBoard, checkpoints): rerunning the command skips finished runs and resumes interrupted ones, and
``tensorboard --logdir <workdir>/runs`` overlays them all.

Outputs in ``<workdir>``: ``results.json`` (per optimizer: swept rates and their final losses, per-seed
final eval loss, mean, std, best rate, tokens, wall time), ``summary.md`` (the table and the verdicts),
``curves.png`` (eval loss of each optimizer's best rate, mean over seeds with the min-max band) and
``sweep.png`` (final eval loss against learning rate), and ``diagnostics_<name>.png`` for each diagnostic named
in ``compare.diagnostics`` (each optimizer's best rate, seed 0; ``tools.diagnostics_plot``).

Every run of a comparison reads the same prepared data, so the same tokenizer: each run records the tokenizer
it used (``done.json``), and a run made with another one (its data dir prepared again with another tokenizer)
is a mismatched setting like any other. The report states the tokenizer and gives bits per byte beside every
loss (``DatasetInfo.bits_per_byte``: the held-out loss per byte of text, which does not depend on the
tokenizer); losses of comparisons made with different tokenizers must not be set side by side, their bits per
byte may.

Verdict rule (Welch's t): the 95% confidence interval of the difference in mean final eval loss between
optimizer X and AdamW, from their seed runs (unequal variances). X is better when the whole interval is below
zero, worse when it is above, and not distinguishable from AdamW otherwise; with one seed on either side there
is no spread to judge by, and the report says "one seed, no verdict". The report also flags a best learning
rate at the edge of its grid (the sweep should be widened) and states the seeds, the tokens per run and the
number of epochs of the training split they amount to (warning above one: the comparison then measures
memorisation as much as optimisation).

A run is reused only if it was made with the comparison's current settings (model, data, steps, batch,
sequence length, optimizer); otherwise the comparison stops naming the differences, or with
``compare.redo_mismatched=True`` sets the old run aside and trains it again.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shlex
import statistics
import time

from absl import app, logging
from ml_collections import config_flags

import configs
from infra.cli import parse_flags_or_exit, user_errors
from infra.files import exists, join, makedirs, move_tree, read_text, resolve, save_figure, write_text
from infra.ranges import check
from tools.diagnostics_plot import check_name, plot_diagnostic

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "compare_cpu.py"), "Comparison config.")

CONFIDENCE = 0.95  # of the Welch interval that decides the verdict
SETTINGS = ("model", "data", "steps", "batch_size", "seq_len", "microbatches", "optimizer", "seed")
# parts of SETTINGS that do not change a run's result (the attention kernel: only up to rounding)
NOT_SETTINGS = ("data.num_threads", "model.attention")


def run_name(opt: str, lr: float, seed: int) -> str:
    return f"{opt}_lr{lr:g}_s{seed}"


def _lrs(cfg, opt: str) -> list[float]:
    """``compare.lrs`` of optimizer ``opt``: a comma list of peak learning rates (positive numbers), keyed by its
    name."""
    if opt not in cfg.compare.lrs:
        raise ValueError(f"compare.lrs has no learning rates for {opt!r}; add --config.compare.lrs.{opt}=...")
    try:
        lrs = [float(x) for x in str(cfg.compare.lrs[opt]).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"compare.lrs.{opt}={cfg.compare.lrs[opt]!r} is not a comma list of numbers") from None
    for lr in lrs:
        check(f"compare.lrs.{opt}", lr, "float > 0")
    return lrs


def _read_done(workdir: str) -> dict | None:
    try:
        return json.loads(read_text(join(workdir, "done.json")))
    except FileNotFoundError:
        return None


def _eval_curve(workdir: str) -> list[tuple[int, float]]:
    from infra.metrics import read_metrics

    return [(r["step"], r["eval_loss"]) for r in read_metrics(workdir) if "eval_loss" in r]


def _train_seconds(workdir: str) -> tuple[list[int], list[float]]:
    """(steps, seconds of training up to each): every logged row's ``step_time`` (the mean time per step
    since the previous row: the optimizer's update included; evaluation, checkpoints and other hook time
    excluded) times the steps it covers. A row without one (the first after a start or resume, whose time
    includes compilation) counts at the run's median step time."""
    from infra.metrics import read_metrics

    rows = [r for r in read_metrics(workdir) if "loss" in r]
    median = statistics.median([r["step_time"] for r in rows if "step_time" in r] or [0.0])
    steps, seconds = [0], [0.0]
    for r in rows:
        if r["step"] > steps[-1]:
            seconds.append(seconds[-1] + r.get("step_time", median) * (r["step"] - steps[-1]))
            steps.append(r["step"])
    return steps, seconds


def _seconds_at(workdir: str, steps):
    """Training seconds at ``steps`` (a step or a sequence of them), interpolated on ``_train_seconds``."""
    import numpy as np

    return np.interp(steps, *_train_seconds(workdir))


class Stopped(Exception):
    """A run of the comparison stopped early (a signal): the comparison stops too, resumably."""


class Comparison:
    def __init__(self, cfg):
        self.cfg = cfg
        self.root = resolve(cfg.workdir)  # a local path or a URI (gs://...)
        self.optimizers = [o.strip() for o in cfg.compare.optimizers.split(",") if o.strip()]
        from optim.registry import REGISTRY

        unknown = [o for o in self.optimizers if o not in REGISTRY]
        if unknown:
            raise ValueError(f"compare.optimizers has unknown names {unknown}; known: {sorted(REGISTRY)}")
        self.sweep = {o: _lrs(cfg, o) for o in self.optimizers}
        self.diagnostics = [d.strip() for d in cfg.compare.diagnostics.split(",") if d.strip()]
        for name in self.diagnostics:
            check_name(name)
        if self.diagnostics and not cfg.diagnostics_every:
            raise ValueError(f"compare.diagnostics={cfg.compare.diagnostics!r} plots what the runs log every "
                             f"diagnostics_every steps, which is 0 (off): add --config.diagnostics_every=N")

    def data_info(self):
        """The comparison's prepared data (None before its first run prepared it)."""
        import data

        try:
            return data.load_info(self.cfg.data.dir)
        except ValueError:
            return None

    def run_dir(self, name: str) -> str:
        return join(self.root, "runs", name)

    def run(self, opt: str, lr: float, seed: int) -> dict:
        """Train one run (or resume it, or return its recorded result if it finished)."""
        from train.loop import NonFiniteLoss, train
        from train.spikes import LossSpikes

        name = run_name(opt, lr, seed)
        workdir = self.run_dir(name)
        cfg = copy.deepcopy(self.cfg)
        with cfg.unlocked():
            del cfg["compare"]
        cfg.workdir, cfg.seed = workdir, seed
        cfg.optimizer.name, cfg.optimizer.lr = opt, lr
        cfg.wandb.group = cfg.wandb.group or os.path.basename(self.root.rstrip("/"))  # W&B: the comparison's runs
        self.check_settings(cfg, workdir)
        done = _read_done(workdir)
        if done is not None:
            return done
        print(f"\n=== {name} ===", flush=True)
        t = time.time()
        try:
            if train(cfg)["stopped_early"]:
                raise Stopped(f"{name} stopped early (its checkpoint is written); rerun the command to resume")
            from infra.metrics import read_metrics

            final = [r for r in read_metrics(workdir) if "eval_loss" in r][-1]
            assert final["step"] == cfg.steps, f"{name}: no eval at the last step"
            # the whole held-out split decides; the periodic evaluations' sample is kept beside it
            final_loss, sampled = final.get("eval_loss_full", final["eval_loss"]), final["eval_loss"]
        except (NonFiniteLoss, LossSpikes) as e:  # a diverging learning rate is a result of the sweep, not a failure
            print(f"{name} diverged: {e}", flush=True)
            final_loss = sampled = None
        info = self.data_info()
        result = {"optimizer": opt, "lr": lr, "seed": seed, "final_eval_loss": final_loss,
                  "final_eval_bpb": None if final_loss is None else info.bits_per_byte(final_loss),
                  "final_eval_loss_sampled": sampled, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
                  "tokenizer": tokenizer_of(info), "wall_seconds": time.time() - t}
        write_text(join(workdir, "done.json"), json.dumps(result, indent=2))
        return result

    def planned(self) -> list[tuple[str, float, int]]:
        """All runs known so far: the sweep, then the seeds of each best rate whose sweep has finished."""
        plan = [(o, lr, 0) for o in self.optimizers for lr in self.sweep[o]]
        for o in self.optimizers:
            best = self.best_lr(o)
            if best is not None:
                plan += [(o, best, s) for s in range(1, self.cfg.compare.seeds)]
        return plan

    def epochs(self) -> float | None:
        """Passes over the training split that one run's tokens amount to (None before the data exists)."""
        info = self.data_info()
        if info is None:
            return None
        return self.cfg.steps * self.cfg.batch_size * self.cfg.seq_len / info.n_tokens["train"]

    def check_settings(self, cfg, workdir: str) -> None:
        """A run in ``workdir`` must have been made with ``cfg``'s settings (``SETTINGS``): otherwise stop
        naming the differences, or with ``compare.redo_mismatched`` set the run aside to be trained again."""
        import data
        from train.config import load_config, upgrade_saved, with_dataset
        from train.resume import config_changes

        try:
            saved = json.loads(read_text(join(workdir, "config.json")))
        except FileNotFoundError:
            return
        now = load_config(cfg)
        now = json.loads(with_dataset(now, data.load_info(now.data.dir).vocab_size).to_json_best_effort())
        saved = upgrade_saved(saved, now["model"]["vocab_size"])  # a run made by an earlier version
        diffs = {k: v for k, v in config_changes({k: saved.get(k) for k in SETTINGS},
                                                  {k: now.get(k) for k in SETTINGS}).items() if k not in NOT_SETTINGS}
        recorded = (_read_done(workdir) or {}).get("tokenizer")
        current = tokenizer_of(self.data_info())
        if recorded and current and recorded["sha256"] != current["sha256"]:
            diffs["tokenizer"] = (recorded["source"], current["source"])
        if not diffs:
            return
        listed = ", ".join(f"{k}: run {a!r}, comparison {b!r}" for k, (a, b) in diffs.items())
        if not self.cfg.compare.get("redo_mismatched", False):
            raise ValueError(f"{workdir} was made with other settings than this comparison's ({listed}); use "
                             f"another --config.workdir, or --config.compare.redo_mismatched=True to set it "
                             f"aside and train it again")
        aside = f"{workdir}.mismatched-{time.strftime('%Y%m%d-%H%M%S')}"
        move_tree(workdir, aside)
        print(f"{workdir}: other settings ({listed}); moved to {aside}, training it again", flush=True)

    def best_lr(self, opt: str) -> float | None:
        results = [_read_done(self.run_dir(run_name(opt, lr, 0))) for lr in self.sweep[opt]]
        if any(r is None for r in results):
            return None
        finite = [r for r in results if r["final_eval_loss"] is not None]
        return min(finite, key=lambda r: r["final_eval_loss"])["lr"] if finite else None

    def status(self, name: str) -> str:
        """pending (no workdir yet), started (not finished), diverged or done."""
        done = _read_done(self.run_dir(name))
        if done is None:
            return "started" if exists(self.run_dir(name)) else "pending"
        return "diverged" if done["final_eval_loss"] is None else "done"

    def print_progress(self) -> None:
        rows = [f"  {run_name(*r):<28} {self.status(run_name(*r))}" for r in self.planned()]
        n_done = sum(r.endswith(("done", "diverged")) for r in rows)
        print(f"comparison in {self.root}: {n_done}/{len(rows)} runs done (seed runs are added once a sweep ends)")
        print("\n".join(rows), flush=True)

    def execute(self) -> dict:
        for o in self.optimizers:
            for lr in self.sweep[o]:
                self.print_progress()
                self.run(o, lr, 0)
        for o in self.optimizers:
            best = self.best_lr(o)
            if best is None:
                print(f"warning: every {o} run diverged; no seeds run for it", flush=True)
                continue
            for s in range(1, self.cfg.compare.seeds):
                self.print_progress()
                self.run(o, best, s)
        self.print_progress()
        return self.report()

    def _entry(self, o: str) -> dict:
        """One optimizer's results from whatever its run workdirs hold now (unfinished runs are listed)."""
        sweep = {lr: _read_done(self.run_dir(run_name(o, lr, 0))) for lr in self.sweep[o]}
        best = self.best_lr(o)
        entry = {"sweep": {f"{lr:g}": r["final_eval_loss"] for lr, r in sweep.items() if r is not None},
                 "best_lr": best, "best_lr_at_grid_edge": best is not None and len(self.sweep[o]) > 1
                 and best in (min(self.sweep[o]), max(self.sweep[o])),
                 "unfinished": [run_name(o, lr, 0) for lr, r in sweep.items() if r is None]}
        if best is None:
            return entry
        runs = {s: _read_done(self.run_dir(run_name(o, best, s))) for s in range(self.cfg.compare.seeds)}
        entry["unfinished"] += [run_name(o, best, s) for s, r in runs.items() if r is None]
        done = {s: r for s, r in runs.items() if r is not None and r["final_eval_loss"] is not None}
        losses = [r["final_eval_loss"] for r in done.values()]
        info = self.data_info()  # (runs recorded before bits per byte were: from their loss and the data's bytes)
        bpb = [r.get("final_eval_bpb") or (info and info.bits_per_byte(r["final_eval_loss"])) for r in done.values()]
        if None not in bpb:
            entry.update(seed_bpb=bpb, mean_bpb=statistics.fmean(bpb))
        sampled = [r.get("final_eval_loss_sampled") for r in done.values()]
        if None not in sampled:  # the last periodic evaluation: the batches the curves are made of
            entry["sampled_mean"] = statistics.fmean(sampled)
        entry.update(seeds=sorted(done), seed_losses=losses, mean=statistics.fmean(losses),
                     std=statistics.stdev(losses) if len(losses) > 1 else 0.0, tokens=done[0]["tokens"],
                     wall_seconds=sum(r["wall_seconds"] for r in list(sweep.values()) + list(runs.values())[1:]
                                      if r is not None))
        return entry

    def report(self) -> dict:
        info = self.data_info()
        results = {"config": json.loads(self.cfg.to_json_best_effort()), "confidence": CONFIDENCE,
                   "epochs": self.epochs(), "tokenizer": tokenizer_of(info),
                   "eval_bytes_per_token": info and info.bytes_per_token("eval"), "optimizers": {}}
        for o in self.optimizers:
            results["optimizers"][o] = self._entry(o)
        add_speedups(results, self)
        makedirs(self.root)
        write_text(join(self.root, "results.json"), json.dumps(results, indent=2))
        write_text(join(self.root, "summary.md"), summary_markdown(results))
        plot_comparison(self, results)
        best = {f"{o} (lr {e['best_lr']:g})": self.run_dir(run_name(o, e["best_lr"], 0))
                for o, e in results["optimizers"].items() if e.get("best_lr") is not None}
        for name in self.diagnostics:
            plot_diagnostic(best, name, join(self.root, f"diagnostics_{name.replace('/', '_')}.png"))
        return results


def tokenizer_of(info) -> dict | None:
    """What identifies a prepared data dir's tokenizer: its kind, where it came from, its vocabulary and the
    sha256 of its file (None without data)."""
    if info is None:
        return None
    t = info.meta["tokenizer"]
    return {"kind": t.get("kind", "sentencepiece"), "source": t["source"], "vocab_size": info.vocab_size,
            "sha256": t["sha256"]}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the eval curve reaches ``target`` (linear interpolation between evals)."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            (s0, l0) = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def add_speedups(results: dict, comp: Comparison) -> None:
    """Steps each optimizer's seed-mean eval curve needs to reach AdamW's mean final eval loss (the last
    periodic evaluation's, which is on the batches the curves are made of, when recorded), the training
    seconds those steps took (``_train_seconds``, mean over seeds), and the speed-ups in steps and in
    seconds relative to AdamW's own curve (which reaches it at its last step)."""
    ref = results["optimizers"].get("adamw", {})
    if "mean" not in ref:
        return
    for o, entry in results["optimizers"].items():
        if entry.get("best_lr") is None:
            continue
        curves = [_eval_curve(comp.run_dir(run_name(o, entry["best_lr"], s))) for s in entry["seeds"]]
        n = min(len(c) for c in curves)
        mean_curve = [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]
        target = ref.get("sampled_mean", ref["mean"])  # on the same held-out batches as the curve
        steps = entry["steps_to_adamw_loss"] = steps_to_reach(mean_curve, target + 1e-9)
        entry["seconds_to_adamw_loss"] = None if steps is None else statistics.fmean(
            float(_seconds_at(comp.run_dir(run_name(o, entry["best_lr"], s)), steps)) for s in entry["seeds"])
    for key, ratio in (("steps_to_adamw_loss", "speedup_vs_adamw"), ("seconds_to_adamw_loss", "wall_speedup_vs_adamw")):
        for entry in results["optimizers"].values():
            mine, adamw = entry.get(key), ref.get(key)
            entry[ratio] = adamw / mine if mine and adamw else None


def welch_interval(x: list[float], y: list[float], confidence: float = CONFIDENCE):
    """(mean(x) - mean(y), low, high): Welch's t interval of the difference of means (unequal variances,
    Welch-Satterthwaite degrees of freedom); None when either sample has fewer than two values."""
    from scipy import stats

    if len(x) < 2 or len(y) < 2:
        return None
    diff = statistics.fmean(x) - statistics.fmean(y)
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    if vx + vy == 0:
        return diff, diff, diff
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(vx + vy)
    return diff, diff - half, diff + half


def verdict(entry: dict, ref: dict) -> str:
    """Better / worse / not distinguishable from AdamW by the Welch interval of the seed runs."""
    if "seed_losses" not in entry or "seed_losses" not in ref:
        return "no result"
    interval = welch_interval(entry["seed_losses"], ref["seed_losses"])
    if interval is None:
        return "one seed, no verdict"
    diff, low, high = interval
    ci = f"{CONFIDENCE:.0%} CI of the difference [{low:+.3f}, {high:+.3f}]"
    if high < 0:
        return f"better than AdamW by {-diff:.3f} ({ci})"
    if low > 0:
        return f"worse than AdamW by {diff:.3f} ({ci})"
    return f"not distinguishable from AdamW ({diff:+.3f}, {ci})"


def summary_markdown(results: dict) -> str:
    cfg = results["config"]
    ref = results["optimizers"].get("adamw", {})
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    lines = [f"# Optimizer comparison: {cfg['model']['name']}, {tokens:,} tokens per run", "",
             "| optimizer | best lr | eval loss (mean ± std over seeds) | bits per byte | steps to AdamW's final loss "
             "| speed-up vs AdamW | train seconds to AdamW's final loss | wall-clock speed-up | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o, e in results["optimizers"].items():
        if "mean" not in e:
            state = "sweep unfinished" if e.get("unfinished") else "diverged at every lr"
            lines.append(f"| {o} | – | {state} | – | – | – | – | – | – |")
            continue
        steps = f"{e['steps_to_adamw_loss']:.0f}" if e.get("steps_to_adamw_loss") else "not reached"
        seconds = f"{e['seconds_to_adamw_loss']:.1f}" if e.get("seconds_to_adamw_loss") else "not reached"
        speed, wall = (f"{e[k]:.2f}x" if e.get(k) else "–" for k in ("speedup_vs_adamw", "wall_speedup_vs_adamw"))
        bpb = f"{e['mean_bpb']:.4f}" if "mean_bpb" in e else "–"
        lines.append(f"| {o} | {e['best_lr']:g} | {e['mean']:.4f} ± {e['std']:.4f} (n={len(e['seed_losses'])}) "
                     f"| {bpb} | {steps} | {speed} | {seconds} | {wall} | {'reference' if o == 'adamw' else verdict(e, ref)} |")
    epochs = results.get("epochs")
    seeds = cfg["compare"]["seeds"]
    lines += ["", f"Verdict rule (decides): Welch's t {results['confidence']:.0%} confidence interval of the "
              f"difference in mean final eval loss against AdamW over {seeds} seed(s) per optimizer; better or "
              f"worse only when the whole interval is on one side of zero. Tokens per run: {tokens:,}"
              + (f" = {epochs:.2f} epochs of the training split" if epochs is not None else "") + ". Final eval loss: "
              f"the whole held-out split after the last step (curves: the periodic evaluations' first "
              f"{cfg['eval_batches']} batches; steps and seconds to AdamW's final loss are read on those curves, "
              "against AdamW's last periodic evaluation). Train seconds: the measured time of the training steps, each "
              "optimizer's update included, evaluation and checkpoints excluded (so they depend on the machine's "
              "load when each run ran)."]
    if epochs is not None and epochs > 1:
        lines.append(f"**Warning: each run sees its training data {epochs:.1f} times: the comparison measures "
                     f"memorisation as much as optimisation.**")
    tok = results.get("tokenizer")
    if tok:
        per_token = results.get("eval_bytes_per_token")
        lines.append(f"Tokenizer: {tok['source']} ({tok['kind']}, {tok['vocab_size']:,} tokens, sha256 "
                     f"{tok['sha256'][:12]}), the same for every run. Losses are in nats per token of this tokenizer "
                     "and compare only with runs that used it; bits per byte (loss / ln 2 / "
                     + (f"{per_token:.3f}" if per_token else "?") + " held-out bytes per token) compare across "
                     "tokenizers.")
    edge = [f"{o} (best lr {e['best_lr']:g})" for o, e in results["optimizers"].items()
            if e.get("best_lr_at_grid_edge")]
    unfinished = [n for e in results["optimizers"].values() for n in e.get("unfinished", [])]
    if unfinished:
        lines.append(f"**Unfinished runs, not counted ({len(unfinished)}):** " + ", ".join(unfinished) + ".")
    if edge:
        lines.append("**Best learning rate at the edge of its grid, widen the sweep:** " + ", ".join(edge) + ".")
    lines += ["",
              "Learning-rate sweeps (seed 0, final eval loss):", ""]
    for o, e in results["optimizers"].items():
        lines.append(f"- {o}: " + ", ".join(f"{lr}: " + ("diverged" if v is None else f"{v:.4f}")
                                            for lr, v in e["sweep"].items()))
    return "\n".join(lines) + "\n"


def plot_comparison(comp: Comparison, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for against, name in (("step", "curves.png"), ("training seconds", "curves_wallclock.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for o, e in results["optimizers"].items():
            if e.get("best_lr") is None:
                continue
            dirs = [comp.run_dir(run_name(o, e["best_lr"], s)) for s in e["seeds"]]
            curves = [_eval_curve(d) for d in dirs]
            n = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:n]]
            x = steps if against == "step" else np.mean([_seconds_at(d, steps) for d in dirs], axis=0)
            losses = np.array([[l for _, l in c[:n]] for c in curves])
            line, = ax.plot(x, losses.mean(0), marker="o", ms=3, label=f"{o} (lr {e['best_lr']:g})")
            ax.fill_between(x, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
        ax.set(xlabel=against + (" (mean over seeds; updates included, evaluation excluded)" if against !=
                                 "step" else ""), ylabel="held-out loss (nats/token)",
               title=f"eval loss against {against} at each optimizer's best lr")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, join(comp.root, name))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for o, e in results["optimizers"].items():
        pts = sorted((float(lr), v) for lr, v in e["sweep"].items() if v is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=o)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final held-out loss (seed 0)",
           title="learning-rate sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, join(comp.root, "sweep.png"))
    plt.close(fig)


def train_command(comp: Comparison, config_file: str, overrides: dict, opt: str, lr: float, seed: int) -> list[str]:
    """The ``python -m train`` command of one run: the comparison's config file and its command-line
    ``overrides``, plus the run's workdir, seed, optimizer and learning rate (train ignores ``compare``)."""
    mine = {"workdir": comp.run_dir(run_name(opt, lr, seed)), "seed": seed, "optimizer.name": opt,
            "optimizer.lr": lr}
    given = {k: v for k, v in _flatten(overrides).items() if k not in mine}
    return (["python", "-m", "train", "--config", os.path.abspath(config_file)]
            + [f"--config.{k}={v}" for k, v in {**given, **mine}.items()])


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def plan(comp: Comparison, config_file: str, overrides: dict) -> list[dict]:
    """Every run known now (seed runs appear once their sweep has finished): name, workdir, status, the job's
    command (``python -m tools.compare ... run NAME``: trains or resumes the run and records its result,
    a divergence included, for ``report``) and the ``python -m train`` command it amounts to; also written
    to ``<workdir>/plan.json``."""
    rows = []
    for o, lr, s in comp.planned():
        name = run_name(o, lr, s)
        job = (["python", "-m", "tools.compare", "--config", os.path.abspath(config_file)]
               + [f"--config.{k}={v}" for k, v in _flatten(overrides).items()] + ["run", name])
        rows.append({"name": name, "workdir": comp.run_dir(name), "status": comp.status(name),
                     "command": shlex.join(job),
                     "train_command": shlex.join(train_command(comp, config_file, overrides, o, lr, s))})
    makedirs(comp.root)
    write_text(join(comp.root, "plan.json"), json.dumps(rows, indent=2))  # atomic: launchers read it
    return rows


USAGE = ("python -m tools.compare --config CONFIG [--config.*=...] [plan | run NAME | report]: no subcommand "
         "runs the whole comparison in this process")


def main(argv) -> None:
    logging.set_verbosity(logging.WARNING)
    from train.build import setup_platform

    command = argv[1:]
    with user_errors():
        cfg = _CONFIG.value  # a config file that failed to load raises when first read
        if command not in ([], ["plan"], ["report"]) and not (len(command) == 2 and command[0] == "run"):
            raise ValueError(f"unknown subcommand {' '.join(command)!r}; usage: {USAGE}")
        comp = Comparison(cfg)
        if command == ["plan"]:
            from absl import flags

            flag = flags.FLAGS["config"]
            for row in plan(comp, config_flags.get_config_filename(flag), config_flags.get_override_values(flag)):
                print(f"{row['name']:<28} {row['status']:<9} {row['command']}")
            print(f"plan written to {join(comp.root, 'plan.json')}")
            return
        if command == ["report"]:  # never trains: whatever the run workdirs hold now
            print(summary_markdown(comp.report()))
            return
        setup_platform(cfg)
        try:
            if command:
                runs = {run_name(*r): r for r in comp.planned()}
                if command[1] not in runs:
                    raise ValueError(f"{command[1]!r} is not a planned run now; see `plan` (seed runs appear once "
                                     "their sweep has finished)")
                print(json.dumps(comp.run(*runs[command[1]]), indent=1))
                return
            results = comp.execute()
        except Stopped as e:  # preempted: like train, exit 0 once the checkpoint is durable
            print(e, flush=True)
            return
    print(summary_markdown(results))
    figures = ["curves.png", "curves_wallclock.png", "sweep.png"] + [
        f"diagnostics_{name.replace('/', '_')}.png" for name in comp.diagnostics]
    print(f"results in {comp.root}: results.json summary.md {' '.join(figures)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
