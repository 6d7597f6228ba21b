"""The training loop: data -> sharded train step -> metrics, evaluation, checkpoints, plots.

``train(config)`` runs (or resumes) the run described by ``config`` in ``config.workdir``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np

import data
from models import count_params, model_config
from optim.factory import make_optimizer, routing_table
from train import mesh as mesh_lib
from infra.checkpoint import CheckpointError, Checkpointer, restore_params, warn
from train.flops import flops_per_token, peak_flops
from infra.metrics import MetricsLogger
from train.plots import plot_losses
from infra.preemption import StopAgreement, StopRequest
from train.state import init_state, make_layout, state_from_params
from train.step import batch_sharding, make_eval_step, make_train_step


class NonFiniteLoss(RuntimeError):
    pass


def setup_platform(cfg) -> None:
    """Must run before JAX starts its backends: simulated CPU devices and multi-process init.

    ``multiprocess=True`` calls ``jax.distributed.initialize()``, which auto-detects SLURM, Open MPI and
    TPU pods. Elsewhere (``launch.local``, other clusters) the job is described by the environment:
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0, read by JAX itself), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``.
    """
    if cfg.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cfg.cpu_devices))
    if cfg.multiprocess:
        if cfg.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if os.environ.get(env):
                kwargs[arg] = int(os.environ[env])
        jax.distributed.initialize(**kwargs)


def build_model_config(cfg, tokenizer_vocab: int):
    m = cfg.model
    vocab = m.vocab_size or tokenizer_vocab
    if m.vocab_multiple > 1:
        vocab = math.ceil(vocab / m.vocab_multiple) * m.vocab_multiple
    if vocab < tokenizer_vocab:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    model_cfg = model_config(m.name, vocab_size=vocab, compute_dtype=m.compute_dtype, remat=m.remat,
                             dropout=m.dropout, document_mask=m.document_mask)
    if cfg.seq_len > model_cfg.ctx:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the context of {m.name} ({model_cfg.ctx})")
    return model_cfg


def _to_global(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _check_steps(cfg) -> None:
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every"):
        if int(cfg[name]) < 1:
            raise ValueError(f"{name}={cfg[name]} must be a positive integer")


def resolve_config(cfg):
    """The config as the run uses it (paths made absolute), as saved in config.json and checkpoints."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.workdir = os.path.abspath(cfg.workdir)
        cfg.data.dir = os.path.abspath(cfg.data.dir)
        if cfg.init_from:
            cfg.init_from = os.path.abspath(cfg.init_from)
    return cfg


def data_order_check(cfg, ds: str, now: dict):
    """``validate`` for ``Checkpointer.restore``: the saved run must read the same batches at each step.
    ``ds``: this run's ``DatasetInfo.identity``; ``now``: its config as saved (JSON)."""
    current = {"seed": cfg.seed, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}

    def validate(step: int, meta: dict, saved: dict) -> None:
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in current.items()
                 if saved.get(k) != v]
        saved_ds = meta.get("data", {}).get("dataset")
        if saved_ds != ds:
            diffs.append(f"dataset: checkpoint {saved.get('data', {}).get('dir')!r} (id {saved_ds}), this run "
                         f"{cfg.data.dir!r} (id {ds})")
        if diffs:
            raise CheckpointError(
                f"the checkpoint at step {step} in {cfg.workdir} was trained with another data order; resuming "
                f"would silently repeat or skip training data:\n  " + "\n  ".join(diffs) + "\nRerun with "
                f"the checkpoint's values (see {os.path.join(cfg.workdir, 'config.json')}), or start a new "
                f"workdir from these weights with --config.init_from={cfg.workdir}")
        changed = [f"{k} {a!r} -> {b!r}" for k, (a, b) in _config_changes(saved, now).items()
                   if k not in ("data.dir", "workdir")]
        if changed:
            warn(f"resuming step {step} with changed settings (the run continues with the new ones): "
                 + ", ".join(changed))

    return validate


def _config_changes(old: dict, new: dict, prefix: str = "") -> dict:
    """{dotted key: (old, new)} of the leaves that differ between two config dicts."""
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_config_changes(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


@functools.lru_cache(maxsize=None)
def _peak_flops(device_kind: str, n_devices: int):
    """``peak_flops`` once per process and kind of device (on CPU it times a matmul)."""
    return peak_flops([d for d in jax.devices() if d.device_kind == device_kind][:1] * n_devices)


def train(cfg, *, devices=None, stop_at: int | None = None) -> dict:
    """Train (or resume) the run; returns the final {'step', 'loss', 'eval_loss', ...} summary.

    ``devices``: the devices of the mesh (default: all). ``stop_at``: behave as if preempted after this
    step (checkpoint and return), for tests and scripted interruptions.
    """
    with StopRequest() as stop:
        return _train(cfg, stop, devices, stop_at)


def _train(cfg, stop: StopRequest, devices, stop_at) -> dict:
    _check_steps(cfg)
    cfg = resolve_config(cfg)
    workdir = cfg.workdir
    info = data.ensure_prepared(cfg.data.dir, corpus=cfg.data.corpus, vocab_size=cfg.data.vocab_size)
    model_cfg = build_model_config(cfg, info.vocab_size)
    mesh = mesh_lib.build_mesh(cfg.mesh, devices)
    mesh_lib.check_model(model_cfg, mesh)
    mesh_lib.check_batch(cfg.batch_size, cfg.microbatches, mesh, jax.process_count())
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    layout = make_layout(model_cfg, optimizer.tx, mesh)
    mesh_lib.check_divisibility(layout.abstract.params, layout.param_specs, mesh)

    pidx, pcount = jax.process_index(), jax.process_count()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints, cfg.keep_every)
    saved_config = json.loads(cfg.to_json_best_effort())
    extra_meta = {"data": {"dataset": info.identity, "dir": cfg.data.dir}}
    t0 = time.perf_counter()
    start_step, state = ckpt.restore_latest(
        layout.abstract, validate=data_order_check(cfg, extra_meta["data"]["dataset"], saved_config))
    restore_s = time.perf_counter() - t0
    origin = f"resumed at step {start_step} ({restore_s:.1f} s)" if state is not None else ""
    if state is None and cfg.init_from:
        from_step, params = restore_params(cfg.init_from, layout.abstract.params)
        start_step, state = 0, state_from_params(optimizer.tx, layout, params)
        origin = f"params from {cfg.init_from} (step {from_step}), fresh optimizer"
    elif state is None:
        start_step, state = 0, init_state(model_cfg, optimizer.tx, layout, cfg.seed)
    if start_step >= cfg.steps:
        ckpt.close()
        return {"step": start_step, "unigram_entropy": info.unigram_entropy_nats, "stopped_early": False,
                "note": f"already at step {start_step} >= steps={cfg.steps}; nothing to do"}
    train_data = data.train_iterator(info, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                     process_index=pidx, process_count=pcount, start_step=start_step,
                                     num_threads=cfg.data.num_threads)
    if pidx == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))

    n_params = count_params(model_cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = flops_per_token(n_params, model_cfg.n_layers, model_cfg.d_model, model_cfg.ctx,
                                     cfg.seq_len) * tokens_per_step
    peak, peak_source = _peak_flops(mesh.devices.flat[0].device_kind, mesh.size)
    logger = MetricsLogger(workdir, cfg.steps, start_step)
    logger.print(f"model {model_cfg.n_layers}L d{model_cfg.d_model} h{model_cfg.n_heads} vocab "
                 f"{model_cfg.vocab_size}: {n_params:,} params | mesh {dict(mesh.shape)} on {mesh.size} "
                 f"{mesh.devices.flat[0].platform} devices, {pcount} process(es) | {tokens_per_step:,} tokens/step | "
                 f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source}) | unigram entropy "
                 f"{info.unigram_entropy_nats:.3f} nats | workdir {workdir}" + (f" | {origin}" if origin else ""))
    if optimizer.labels is not None:
        params = layout.abstract.params
        logger.print(f"{cfg.optimizer.name} routing:\n" + routing_table(params, optimizer.labels(params)))

    train_step = make_train_step(layout, optimizer.tx, optimizer.schedule, mesh, microbatches=cfg.microbatches,
                                 seed=cfg.seed, dropout=model_cfg.dropout > 0)
    eval_step = make_eval_step(layout, mesh)
    b_sharding = batch_sharding(mesh)
    eval_set = [_to_global(b, b_sharding) for b in data.eval_batches(
        info, seq_len=cfg.seq_len, batch_size=cfg.batch_size, process_index=pidx, process_count=pcount,
        max_batches=cfg.eval_batches)]

    def evaluate(params) -> float:
        sums = [eval_step(params, b) for b in eval_set]
        total, count = (float(sum(jax.device_get(x[i]) for x in sums)) for i in (0, 1))
        return total / count

    last = {"step": start_step}
    timer = {"t": None, "step": start_step}

    def record(step: int, metrics) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise NonFiniteLoss(
                f"training loss became {m['loss']} at step {step} (grad norm {m['grad_norm']:.3g}); "
                f"lower --config.optimizer.lr, enable clipping (--config.optimizer.clip_norm) or resume from "
                f"the last checkpoint in {ckpt.directory}")
        last.update(step=step, loss=m["loss"])
        if step % cfg.log_every and step != cfg.steps:
            return
        now = time.perf_counter()
        if timer["t"] is not None:
            dt = (now - timer["t"]) / (step - timer["step"])
            m.update(step_time=dt, tokens_per_sec=tokens_per_step / dt, mfu=flops_per_step / dt / peak)
        timer.update(t=now, step=step)
        m["tokens"] = step * tokens_per_step
        if ckpt_time["pending"] is not None:
            m["checkpoint_s"] = ckpt_time["pending"]
            ckpt_time["pending"] = None
        logger.write(step, m)
        logger.progress(step, loss=m["loss"], tok_s=f"{m.get('tokens_per_sec', 0):.0f}")

    ckpt_time = {"pending": None}
    agree = StopAgreement()
    pending, stopping = None, False
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step, cfg.steps):
                batch = _to_global(next(train_data), b_sharding)
                state, metrics = train_step(state, batch)
                done = step + 1
                # every process gets the same answer at the same step (see train.preemption)
                stopping = agree(stop.requested) or (stop_at is not None and done >= stop_at)
                if pending is not None:
                    record(*pending)
                pending = (done, metrics)
                if timer["t"] is None and step == start_step:
                    record(*pending)  # waits for the first step (compilation), then times from here
                    pending = None
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    last["eval_loss"] = evaluate(state.params)
                    logger.write(done, {"eval_loss": last["eval_loss"], "tokens": done * tokens_per_step})
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                    if pending is not None:
                        record(*pending)  # never checkpoint a state whose loss was not checked
                        pending = None
                    ckpt.save(done, state, train_data, saved_config, extra_meta)
                    ckpt_time["pending"] = ckpt.last_save_blocking_s
                if stopping:
                    break
            if pending is not None:
                record(*pending)
    finally:
        t0 = time.perf_counter()
        ckpt.close()  # waits until the last save is durable (also when the loop failed)
    if stopping:
        why = (f"{stop.signal_name} received" if stop.signal_name else
               "stop requested by another process" if stop_at is None else f"stop_at={stop_at} reached")
        msg = (f"{why}: checkpoint of step {last['step']} written to {ckpt.step_dir(last['step'])} (durable "
               f"{time.perf_counter() - t0:.1f} s after the step); exiting")
        logger.print(msg) if pidx == 0 else print(msg, flush=True)
    logger.close()
    if pidx == 0 and logger.rows:
        last["plot"] = plot_losses(workdir, info.unigram_entropy_nats)
    last["unigram_entropy"] = info.unigram_entropy_nats
    last["stopped_early"] = last["step"] < cfg.steps
    last["checkpoint"] = ckpt.step_dir(last["step"])
    return last
