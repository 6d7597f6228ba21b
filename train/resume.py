"""Where a run starts: its latest usable checkpoint, another run's parameters or a transformers GPT-2
checkpoint's (``init_from``), or a fresh initialisation; and the check that a checkpoint was written with the
same data order."""
from __future__ import annotations

import time

import jax

from infra.checkpoint import CheckpointError, restore_params, warn
from infra.files import join
from models.hf_gpt2 import check_hf_config, from_hf, is_hf_checkpoint, read_hf_checkpoint
from train.config import upgrade_saved


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
                f"the checkpoint's values (see {join(cfg.workdir, 'config.json')}), or start a new "
                f"workdir from these weights with --config.init_from={cfg.workdir}")
        changed = [f"{k} {a!r} -> {b!r}" for k, (a, b) in config_changes(upgrade_saved(saved, cfg.model.vocab_size),
                                                                          now).items()
                   if k not in ("data.dir", "workdir")]
        if changed:
            warn(f"resuming step {step} with changed settings (the run continues with the new ones): "
                 + ", ".join(changed))

    return validate


def config_changes(old: dict, new: dict, prefix: str = "") -> dict:
    """{dotted key: (old, new)} of the leaves that differ between two config dicts."""
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def start_state(run, ckpt, saved_config: dict, extra_meta: dict):
    """(start step, train state, how it was obtained: "" for a fresh init) of ``run``."""
    cfg = run.cfg
    t0 = time.perf_counter()
    validate = data_order_check(cfg, extra_meta["data"]["dataset"], saved_config)
    step, state = ckpt.restore_latest(run.layout.abstract, validate=validate, start_over=cfg.start_over)
    if state is not None:
        return step, state, f"resumed at step {step} ({time.perf_counter() - t0:.1f} s)"
    if cfg.init_from and is_hf_checkpoint(cfg.init_from):
        params = hf_params(cfg.init_from, run.model_cfg, run.layout.abstract.params)
        return 0, run.state_from_params(params), f"params from the transformers checkpoint {cfg.init_from}, fresh " \
                                                 "optimizer"
    if cfg.init_from:
        from_step, params = restore_params(cfg.init_from, run.layout.abstract.params)
        return 0, run.state_from_params(params), f"params from {cfg.init_from} (step {from_step}), fresh optimizer"
    return 0, run.init_state(), ""


def hf_params(path: str, model_cfg, abstract_params):
    """The parameters of the transformers GPT-2 checkpoint dir ``path`` (``models.hf_gpt2``: the same shape as
    ``model_cfg``, its vocabulary padded to the model's) as arrays in ``abstract_params``' shardings; every
    process reads the whole file and places its own shards."""
    config, tensors = read_hf_checkpoint(path)
    check_hf_config(config, model_cfg, where=path)
    params = from_hf(tensors, model_cfg, where=path)
    return jax.tree.map(lambda a, x: jax.make_array_from_callback(a.shape, a.sharding, lambda index: x[index]),
                        abstract_params, params)
