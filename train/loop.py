"""The training loop: batches -> sharded train step -> hooks (metrics, evaluation, checkpoints, plots).

``train(config)`` runs (or resumes) the run described by ``config`` in ``config.workdir``: it loads the config
(``train.config``), prepares the dataset, builds the run and steps it. The loop itself (``Trainer.fit``) only
steps and calls hooks; what happens every N steps is a hook added with ``add_hook(fn, every=N)`` (called
with a ``StepInfo`` holding the step and the train state) or ``add_metrics_hook(fn, every=N)`` (a
``StepInfo`` holding the step's metrics on the host), as in Levanter's ``Trainer.add_hook``. A hook returns
a row of metrics (a dict) or None; the trainer writes every row to ``metrics.jsonl`` and TensorBoard and
keeps the latest value of each key for the run's summary. Hooks share nothing else.

A step's metrics are read one step late (after the next step is dispatched), so the loop never waits for the
device; every step's loss is checked (a NaN/inf stops the run) before its state can be checkpointed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable

import jax

from infra.checkpoint import Checkpointer
from infra.files import join, makedirs, write_text
from infra.lease import WorkdirLease
from infra.metrics import MetricsLogger
from infra.preemption import StopAgreement, StopRequest
from optim.registry import routing_table
from train.build import Run, build_run, prepare_dataset
from train.config import load_config, with_dataset
from train.diagnostics import is_diagnostic
from train.evaluation import TaskScorer, heldout_loss, heldout_row
from train.flops import peak_flops
from train.plots import plot_losses
from train.profiler import Profiler, profile_window
from train.resume import start_state
from train.spikes import SpikeGuard
from train.tasks import Task, read_tasks


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook is given: the number of steps done, and the train state after them (step hooks) or the
    step's metrics on the host, checked finite (metrics hooks); ``hook_seconds``: the wall time spent in step
    hooks so far, which is not training time."""
    step: int
    state: Any = None
    metrics: dict | None = None
    hook_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(StepInfo) -> row or None`` after every ``every``-th step and after the last one; with ``on_stop``
    also at the step where the run stops early; with ``checked`` only once that step's loss has been checked."""
    fn: Callable[[StepInfo], dict | None]
    every: int
    on_stop: bool = False
    checked: bool = False

    def due(self, step: int, last: int, stopping: bool) -> bool:
        return step % self.every == 0 or step == last or (self.on_stop and stopping)


class Trainer:
    """Steps ``run``'s train step over its batches and calls the hooks, writing the rows they return to
    ``logger``; stops when the run is done, on a signal (``stop``: every process stops after the same step)
    or after ``stop_at`` steps."""

    def __init__(self, run: Run, logger: MetricsLogger, stop: StopRequest, stop_at: int | None = None,
                 guard: SpikeGuard | None = None):
        self.run, self.logger, self.stop, self.stop_at, self.guard = run, logger, stop, stop_at, guard
        self.hooks: list[Hook] = []
        self.metrics_hooks: list[Hook] = []
        self.stopping = False
        self.last: dict = {}  # the latest value of every key of the rows so far, and the last checked step
        self.hook_seconds = 0.0  # wall time spent in step hooks (evaluation, checkpoints, plots) so far
        self.previous_updates = None  # the updates of the last diagnostics step (train.diagnostics)

    def add_hook(self, fn: Callable, every: int, *, on_stop: bool = False, checked: bool = False) -> None:
        self.hooks.append(Hook(fn, every, on_stop, checked))

    def add_metrics_hook(self, fn: Callable, every: int) -> None:
        self.metrics_hooks.append(Hook(fn, every))

    def _record(self, step: int, row: dict | None) -> None:
        """Write a hook's row (and show a training row's loss and throughput on the progress bar)."""
        if not row:
            return
        self.last.update(row)
        self.logger.write(step, row)
        if "loss" in row:  # the first row after a start has no rate yet (its time includes compilation)
            rate = {"tok_s": f"{row['tokens_per_sec']:.0f}"} if "tokens_per_sec" in row else {}
            self.logger.progress(step, loss=row["loss"], **rate)

    def _check(self, step: int, metrics) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise NonFiniteLoss(
                f"training loss became {m['loss']} at step {step} (grad norm {m['grad_norm']:.3g}); lower "
                f"--config.optimizer.lr or enable clipping (--config.optimizer.clip_norm)")
        if self.guard is not None:
            self.guard.record(step, m)
        self.last.update(step=step, **m)
        for hook in self.metrics_hooks:
            if hook.due(step, self.run.cfg.steps, False):
                self._record(step, hook.fn(StepInfo(step, metrics=m, hook_seconds=self.hook_seconds)))
        if self.guard is not None:
            self.guard.check(step, m)  # after the step's row is written

    def _call_hooks(self, done: int, state, pending):
        """The step hooks due after ``done`` steps; returns the metrics still unchecked."""
        for hook in self.hooks:
            if hook.due(done, self.run.cfg.steps, self.stopping):
                if hook.checked and pending is not None:
                    self._check(*pending)
                    pending = None
                t0 = time.perf_counter()
                row = hook.fn(StepInfo(done, state=state, hook_seconds=self.hook_seconds))
                self.hook_seconds += time.perf_counter() - t0
                self._record(done, row)
        return pending

    def _step(self, done: int, state, batch):
        """Step ``done``: the train step, or every ``diagnostics_every`` steps the one with diagnostics (given
        the updates of the previous one, kept on the devices)."""
        extra = () if self.guard is None else (self.guard.max_loss(done),)
        every = self.run.cfg.diagnostics_every
        if not every or done % every:
            return self.run.step_to_call[0](state, batch, *extra)
        if self.previous_updates is None:
            self.previous_updates = self.run.zero_updates(state.params)
        state, metrics, self.previous_updates = self.run.diagnostics_step(state, batch, self.previous_updates,
                                                                          *extra)
        return state, metrics

    def fit(self, state, start_step: int, batches):
        """Train from ``state`` at ``start_step``; returns the last state."""
        agree, pending, last = StopAgreement(), None, self.run.cfg.steps
        self.last = {"step": start_step}
        with jax.set_mesh(self.run.mesh):
            for step in range(start_step, last):
                done = step + 1
                state, metrics = self._step(done, state, self.run.to_global(next(batches)))
                # every process gets the same answer at the same step (see infra.preemption)
                self.stopping = agree(self.stop.requested) or (self.stop_at is not None and done >= self.stop_at)
                if pending is not None:
                    self._check(*pending)
                pending = (done, metrics)
                if step == start_step:  # waits for the first step (compilation); throughput is timed from here
                    self._check(*pending)
                    pending = None
                pending = self._call_hooks(done, state, pending)
                if self.stopping:
                    break
            if pending is not None:
                self._check(*pending)
        return state


class Throughput:
    """The metrics hook: the step's metrics with throughput and MFU since the previous row. The time the
    trainer spent in its step hooks (evaluation, checkpoints, plots) is not training time and is left out."""

    def __init__(self, run: Run):
        self.run = run
        self.peak, self.peak_source = _peak_flops(run.mesh.devices.flat[0].device_kind, run.mesh.size)
        self.timer = None  # (time - hook time, step) of the previous row

    def __call__(self, info: StepInfo) -> dict:
        now = time.perf_counter() - info.hook_seconds
        row = {k: v for k, v in info.metrics.items() if not is_diagnostic(k)}
        if self.timer is not None:
            dt = (now - self.timer[0]) / (info.step - self.timer[1])
            row.update(step_time=dt, tokens_per_sec=self.run.tokens_per_step / dt,
                       mfu=self.run.flops_per_step / dt / self.peak)
        self.timer = (now, info.step)
        row["tokens"] = info.step * self.run.tokens_per_step
        return row


@functools.lru_cache(maxsize=None)
def _peak_flops(device_kind: str, n_devices: int):
    """``peak_flops`` once per process and kind of device (on CPU it times a matmul)."""
    return peak_flops([d for d in jax.devices() if d.device_kind == device_kind][:1] * n_devices)


def _header(run: Run, log: Throughput, origin: str) -> str:
    m, mesh, info = run.model_cfg, run.mesh, run.data
    return (f"model {m.n_layers}L d{m.d_model} h{m.n_heads} vocab {m.vocab_size}: {run.n_params:,} params | mesh "
            f"{dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} "
            f"process(es) | {run.tokens_per_step:,} tokens/step | peak {log.peak / 1e9:.0f} GFLOP/s "
            f"({log.peak_source}) | unigram entropy {info.unigram_entropy_nats:.3f} nats | workdir "
            f"{run.cfg.workdir}" + (f" | {origin}" if origin else ""))


def _evaluation(run: Run, tasks: list[Task]) -> Callable:
    """The evaluation hook: mean held-out loss over the first ``eval_batches`` held-out batches
    (``eval_loss``) and, after the last step, also over ``final_eval_batches`` of them, by default the whole
    held-out split (``eval_loss_full``: the number a comparison decides on; the periodic one is a sample),
    each with its bits per byte (``eval_bpb``, ``eval_bpb_full``; ``train.evaluation``), and the accuracy
    on each multiple-choice task of ``eval_tasks`` (``task/<name>/acc``, ``task/<name>/acc_norm``)."""
    eval_set = run.eval_batches(run.cfg.eval_batches)
    scorer = TaskScorer(run, tasks, progress=False) if tasks else None  # (inside the train bar)

    def evaluate(info: StepInfo) -> dict:
        row = heldout_row(run.data, heldout_loss(run, info.state.params, eval_set)[0])
        if info.step == run.cfg.steps:
            full = heldout_loss(run, info.state.params, run.eval_batches(run.cfg.final_eval_batches or None))[0]
            row.update(heldout_row(run.data, full, "eval_loss_full"))
        if scorer is not None:
            row.update(scorer.row(info.state.params))
        return {**row, "tokens": info.step * run.tokens_per_step}

    return evaluate


def train(cfg, *, devices=None, stop_at: int | None = None) -> dict:
    """Train (or resume) the run of ``cfg`` (as given on the command line: it is loaded here); returns the
    final {'step', 'loss', 'eval_loss', ...} summary.

    ``devices``: the devices of the mesh (default: all). ``stop_at``: behave as if preempted after this
    step (checkpoint and return), for tests and scripted interruptions.
    """
    cfg = load_config(cfg)
    with StopRequest() as stop:
        build_run(cfg, devices).check_optimizer()  # a bad optimizer setting fails before a corpus is prepared
        tasks = read_tasks(cfg.eval_tasks)  # and so does a bad task file
        dataset = prepare_dataset(cfg)
        run = build_run(with_dataset(cfg, dataset.vocab_size), devices, dataset=dataset).check()
        # one writer per workdir: process 0 holds the lease for the job
        with WorkdirLease(run.cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            return _train(run, stop, stop_at, tasks)


def _train(run: Run, stop: StopRequest, stop_at: int | None, tasks: list[Task]) -> dict:
    cfg, info = run.cfg, run.data
    ckpt = Checkpointer(join(cfg.workdir, "checkpoints"), cfg.keep_checkpoints, cfg.keep_every,
                        keep_set_aside=cfg.keep_set_aside)
    saved_config = json.loads(cfg.to_json_best_effort())
    extra_meta = {"data": {"dataset": info.identity, "dir": cfg.data.dir}}
    start_step, state, origin = start_state(run, ckpt, saved_config, extra_meta)
    if start_step >= cfg.steps:
        ckpt.close()
        return {"step": start_step, "unigram_entropy": info.unigram_entropy_nats, "stopped_early": False,
                "note": f"already at step {start_step} >= steps={cfg.steps}; nothing to do"}
    batches = run.train_batches(start_step)
    if jax.process_index() == 0:
        makedirs(cfg.workdir)
        write_text(join(cfg.workdir, "config.json"), cfg.to_json_best_effort(indent=2))
    logger = MetricsLogger(cfg.workdir, cfg.steps, start_step, wandb=cfg.wandb.to_dict(), config=saved_config)
    spikes = cfg.loss_spike
    guard = SpikeGuard(spikes.factor, spikes.window, spikes.max_skips, ckpt.meta(start_step).get("loss_spike")
                       if origin.startswith("resumed") else None) if spikes.factor else None
    trainer = Trainer(run, logger, stop, stop_at, guard)
    throughput = Throughput(run)
    logger.print(_header(run, throughput, origin))
    if run.step_to_call[1]:
        logger.print(run.step_to_call[1])
    if run.optimizer.labels is not None:
        params = run.layout.abstract.params
        logger.print(f"{cfg.optimizer.name} routing:\n" + routing_table(params, run.optimizer.labels(params)))
    if run.placement is not None:
        logger.print(f"Newton-Schulz: {run.placement.name} over the mesh (optimizer.orthogonalize="
                     f"{cfg.optimizer.orthogonalize})")
    window = profile_window(cfg.profile_steps, cfg.steps)
    profiler = Profiler(cfg.workdir, window, start_step) if window else None
    if profiler:
        trainer.add_hook(profiler, every=1)
        logger.print(f"tracing steps {window[0]}-{window[1]} with jax.profiler into {profiler.directory}")
    trainer.add_metrics_hook(throughput, cfg.log_every)
    if cfg.diagnostics_every:  # update_cos is NaN on the first diagnostics step (no previous update): left out
        trainer.add_metrics_hook(lambda info: {k: v for k, v in info.metrics.items()
                                               if is_diagnostic(k) and math.isfinite(v)}, cfg.diagnostics_every)
    _add_output_hooks(run, trainer, ckpt, tasks, lambda step, state: ckpt.save(
        step, state, batches, saved_config, {**extra_meta, "loss_spike": guard.state()} if guard else extra_meta))
    try:
        trainer.fit(state, start_step, batches)
    except NonFiniteLoss as e:
        _close_quietly(logger)
        steps = ckpt.steps()
        where = (f"rerunning resumes from its last checkpoint, {ckpt.step_dir(steps[-1])}" if steps else
                 "no checkpoint was written yet, so rerunning starts from step 0")
        raise NonFiniteLoss(f"{e}; {where}") from None
    except BaseException:
        _close_quietly(logger)
        raise
    finally:
        if profiler:
            profiler.close()
        t0 = time.perf_counter()
        ckpt.close()  # waits until the last save is durable (also when the loop failed)
    return _summary(run, trainer, logger, ckpt, time.perf_counter() - t0)


def _add_output_hooks(run: Run, trainer: Trainer, ckpt: Checkpointer, tasks: list[Task], save: Callable) -> None:
    """Evaluation (with ``tasks``), checkpoints (``save(step, state)``; whether the last asynchronous save
    failed is looked at after every step) and the loss plot."""
    def checkpoint(info: StepInfo) -> dict:
        save(info.step, info.state)
        return {"checkpoint_s": ckpt.last_save_blocking_s}

    def plot(info: StepInfo) -> None:  # loss.png, redrawn as the run goes
        if jax.process_index() == 0:
            plot_losses(run.cfg.workdir, run.data.unigram_entropy_nats)

    trainer.add_hook(_evaluation(run, tasks), run.cfg.eval_every)
    trainer.add_hook(checkpoint, run.cfg.checkpoint_every, on_stop=True, checked=True)
    trainer.add_hook(lambda info: ckpt.check(), every=1)  # a failed asynchronous save stops the run at once
    trainer.add_hook(plot, run.cfg.eval_every, on_stop=True, checked=True)


def _close_quietly(logger: MetricsLogger) -> None:
    """Close the outputs of a failing run: its progress bar ends before the error is printed, and a second
    error while closing (a full disk) does not hide the first."""
    with contextlib.suppress(Exception):
        logger.close()


def _summary(run: Run, trainer: Trainer, logger: MetricsLogger, ckpt: Checkpointer, durable_s: float) -> dict:
    """Close the outputs and say how the run ended (the loss plot is written by its hook at the last step)."""
    last = {k: v for k, v in trainer.last.items()
            if k in ("step", "loss", "eval_loss", "eval_bpb", "eval_loss_full", "eval_bpb_full")
            or k.startswith("task/")}
    if trainer.stopping:
        why = (f"{trainer.stop.signal_name} received" if trainer.stop.signal_name else
               "stop requested by another process" if trainer.stop_at is None else
               f"stop_at={trainer.stop_at} reached")
        msg = (f"{why}: checkpoint of step {last['step']} written to {ckpt.step_dir(last['step'])} (durable "
               f"{durable_s:.1f} s after the step); exiting")
        logger.print(msg) if jax.process_index() == 0 else print(msg, flush=True)
    logger.close()
    if jax.process_index() == 0:
        last["plot"] = join(run.cfg.workdir, "loss.png")
    last["unigram_entropy"] = run.data.unigram_entropy_nats
    last["stopped_early"] = last["step"] < run.cfg.steps
    last["checkpoint"] = ckpt.step_dir(last["step"])
    return last
