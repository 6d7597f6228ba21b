"""The training loop: data -> sharded train step -> metrics, evaluation, checkpoints, plots.

``train(config)`` runs (or resumes) the run described by ``config`` in ``config.workdir``.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import data
from models import count_params, model_config
from optim.factory import make_optimizer
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import flops_per_token, peak_flops
from train.metrics import MetricsLogger
from train.plots import plot_losses
from train.preemption import StopRequest
from train.state import init_state, make_layout
from train.step import batch_sharding, make_eval_step, make_train_step


class NonFiniteLoss(RuntimeError):
    pass


def setup_platform(cfg) -> None:
    """Must run before JAX starts its backends: simulated CPU devices and multi-process init."""
    if cfg.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cfg.cpu_devices))
    if cfg.multiprocess:
        if cfg.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()


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


def train(cfg) -> dict:
    """Train (or resume) the run; returns the final {'step', 'loss', 'eval_loss', ...} summary."""
    _check_steps(cfg)
    workdir = os.path.abspath(cfg.workdir)
    info = data.ensure_prepared(cfg.data.dir, corpus=cfg.data.corpus, vocab_size=cfg.data.vocab_size)
    model_cfg = build_model_config(cfg, info.vocab_size)
    mesh = mesh_lib.build_mesh(cfg.mesh)
    mesh_lib.check_model(model_cfg, mesh)
    mesh_lib.check_batch(cfg.batch_size, cfg.microbatches, mesh, jax.process_count())
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    layout = make_layout(model_cfg, optimizer.tx, mesh)
    mesh_lib.check_divisibility(layout.abstract.params, layout.param_specs, mesh)

    pidx, pcount = jax.process_index(), jax.process_count()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints, cfg.keep_every)
    start_step, state = ckpt.restore_latest(layout.abstract)
    if state is None:
        start_step, state = 0, init_state(model_cfg, optimizer.tx, layout, cfg.seed)
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
    peak, peak_source = peak_flops(jax.devices())
    logger = MetricsLogger(workdir, cfg.steps, start_step)
    logger.print(f"model {model_cfg.n_layers}L d{model_cfg.d_model} h{model_cfg.n_heads} vocab "
                 f"{model_cfg.vocab_size}: {n_params:,} params | mesh {dict(mesh.shape)} on {len(jax.devices())} "
                 f"{jax.devices()[0].platform} devices, {pcount} process(es) | {tokens_per_step:,} tokens/step | "
                 f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source}) | unigram entropy "
                 f"{info.unigram_entropy_nats:.3f} nats | workdir {workdir}"
                 + (f" | resumed at step {start_step}" if start_step else ""))

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
        logger.write(step, m)
        logger.progress(step, loss=m["loss"], tok_s=f"{m.get('tokens_per_sec', 0):.0f}")

    pending = None
    with StopRequest() as stop, jax.set_mesh(mesh):
        for step in range(start_step, cfg.steps):
            batch = _to_global(next(train_data), b_sharding)
            state, metrics = train_step(state, batch)
            if pending is not None:
                record(*pending)
            pending, done = (step + 1, metrics), step + 1
            if timer["t"] is None and step == start_step:
                record(*pending)  # waits for the first step (compilation), then times from here
                pending = None
            if done % cfg.eval_every == 0 or done == cfg.steps:
                last["eval_loss"] = evaluate(state.params)
                logger.write(done, {"eval_loss": last["eval_loss"], "tokens": done * tokens_per_step})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.requested:
                if pending is not None:
                    record(*pending)  # never checkpoint a state whose loss was not checked
                    pending = None
                ckpt.save(done, state, train_data, cfg.to_dict())
            if stop.requested:
                break
        if pending is not None:
            record(*pending)
        ckpt.close()
    logger.close()
    if pidx == 0 and logger.rows:
        last["plot"] = plot_losses(workdir, info.unigram_entropy_nats)
    last["unigram_entropy"] = info.unigram_entropy_nats
    last["stopped_early"] = last["step"] < cfg.steps
    return last
