"""The optimizer factory: every optimizer of the project by name, built from the ``optimizer`` config.

``make_optimizer(cfg, total_steps)`` returns an ``Optimizer(tx, schedule)``: ``tx`` is an
``optax.GradientTransformationExtraArgs`` (the train step always passes ``loss=`` so that optimizers
that need the loss, like VeLO, receive it; the others ignore it) that already includes global-norm
clipping, and ``schedule(step)`` gives the peak-relative learning rate used for logging.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import optax

from optim.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformationExtraArgs
    schedule: optax.Schedule
    labels: Callable | None = None  # params -> tree of branch names, for optimizers that route leaves


def routing_table(params, labels) -> str:
    """One line per leaf (key path, shape, optimizer branch), then the parameter count per branch."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    rows = [(jax.tree_util.keystr(path), str(tuple(p.shape)), label)
            for (path, p), label in zip(leaves, jax.tree.leaves(labels))]
    wp, ws = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    totals = {}
    for (_, p), (_, _, label) in zip(leaves, rows):
        totals[label] = totals.get(label, 0) + math.prod(p.shape)
    return "\n".join([f"{path:<{wp}}  {shape:<{ws}}  {label}" for path, shape, label in rows]
                      + ["  ".join(f"{label}: {n:,} params" for label, n in sorted(totals.items()))])


def matrices_only(params):
    """Weight-decay mask: True for weight matrices and embeddings (ndim >= 2), False for biases and norms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(cfg, schedule, total_steps):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=matrices_only)


def _muon(cfg, schedule, total_steps):
    from optim.muon import muon

    ratio = cfg.adam_lr_mult or 0.15
    return muon(schedule, lambda t: ratio * schedule(t), beta=cfg.muon_beta, nesterov=cfg.muon_nesterov,
                weight_decay=cfg.weight_decay, adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps)


def _celo2(cfg, schedule, total_steps):
    from optim.celo2 import celo2

    return celo2(schedule, cfg.theta or None, weight_decay=cfg.weight_decay, mult_1d=cfg.adam_lr_mult or 20.0)


def _celo2_base(cfg, schedule, total_steps):
    from optim.celo2 import celo2_base

    return celo2_base(schedule, cfg.theta or None, weight_decay=cfg.weight_decay)


def _velo(cfg, schedule, total_steps):
    """VeLO sets its own step sizes; ``optimizer.lr`` multiplies its update (1 = VeLO as published) and the
    schedule is ignored. Weight decay as learned_optimization's wrapper: on the gradient and the loss."""
    from optim.velo import velo

    return optax.chain(velo(cfg.theta or None, total_steps, weight_decay=cfg.weight_decay), optax.scale(cfg.lr))


BUILDERS: dict[str, Callable] = {
    "adamw": _adamw,
    "muon": _muon,
    "celo2": _celo2,
    "celo2-base": _celo2_base,
    "velo": _velo,
}

def _labels(module: str):
    def labels(params):
        import importlib

        return importlib.import_module(module).param_labels(params)
    return labels


# Optimizers that send different leaves to different rules: their routing is printed at start-up.
LABELS = {"muon": _labels("optim.muon"), "celo2": _labels("optim.celo2")}

# Optimizers that ignore the schedule: the logged lr is then the constant multiplier.
CONSTANT_LR = ("velo",)

# Peak lr when ``optimizer.lr`` is 0: AdamW's GPT-style 3e-3 (this project's small models), Muon's usual
# 0.02, the Celo2 rules' meta-training step size 1e-3 (their step has RMS 1, like Adam's scale), and VeLO
# as published (its lr multiplies the step it sizes itself).
DEFAULT_LR = {"adamw": 3e-3, "muon": 0.02, "celo2": 1e-3, "celo2-base": 1e-3, "velo": 1.0}


def make_optimizer(cfg, total_steps: int) -> Optimizer:
    """Build the optimizer named ``cfg.name`` with its schedule and global-norm clipping (``cfg.clip_norm``);
    ``cfg.lr`` 0 means the optimizer's ``DEFAULT_LR``."""
    if cfg.name not in BUILDERS:
        raise ValueError(f"optimizer.name={cfg.name!r} is not known; choose one of: {', '.join(BUILDERS)}")
    if not cfg.lr:
        cfg = cfg.copy_and_resolve_references()
        cfg.lr = DEFAULT_LR[cfg.name]
    if cfg.name in CONSTANT_LR:
        schedule = optax.constant_schedule(cfg.lr)
    else:
        schedule = make_schedule(cfg.schedule, cfg.lr, total_steps, cfg.warmup_steps,
                                 cfg.min_lr_ratio, cfg.decay_fraction)
    tx = BUILDERS[cfg.name](cfg, schedule, total_steps)
    if cfg.clip_norm:
        if cfg.clip_norm < 0:
            raise ValueError(f"optimizer.clip_norm={cfg.clip_norm} must be >= 0 (0 disables clipping)")
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return Optimizer(optax.with_extra_args_support(tx), schedule, LABELS.get(cfg.name))
