"""Every optimizer of the project by name: one ``OptimizerSpec`` record each, the only place that says how
an optimizer is built, which rule each parameter goes to, its default learning rate, its weight files and
how it is meta-trained.

``make_optimizer(cfg, total_steps)`` returns an ``Optimizer(tx, schedule, labels)``: ``tx`` is an
``optax.GradientTransformationExtraArgs`` (the train step always passes ``loss=`` so that optimizers
that need the loss, like VeLO, receive it; the others ignore it) that already includes global-norm
clipping, and ``schedule(step)`` gives the learning rate used for logging.

    from optim.registry import REGISTRY, get
    get("celo2").default_lr            # 1e-3
    get("velo").weights.load(path)      # a VeLO parameter file
    get("celo2").meta.outer_lr          # PES outer lr
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import optax

from optim import celo2 as celo2_lib
from optim import muon as muon_lib
from optim import velo as velo_lib
from optim.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A learned optimizer's weight file: ``load(path) -> theta`` (validated) and ``save(path, theta)`` (its
    official format, atomically). Without ``optimizer.theta`` each optimizer uses its shipped file,
    ``optim/weights/<name>.state``."""
    load: Callable
    save: Callable


@dataclasses.dataclass(frozen=True)
class MetaTraining:
    """How PES meta-trains a learned optimizer (``optim.meta``).

    rule(theta):  the raw learned rule, whose update is *added* to the params (no learning rate);
    adam_1d:      the leaves matching ``--regex_1d`` (biases) go to the meta-training Adam instead;
    init(key):    the theta a run starts from with ``--init random``;
    rule_init:    ``--init rule``: a hand-designed rule the network represents exactly, or None;
    step_mult:    default inner lr (the rule's update times this);  outer_lr: default PES outer lr.
    """
    rule: Callable
    adam_1d: bool
    init: Callable
    rule_init: Callable | None
    step_mult: float
    outer_lr: float


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer. ``build(cfg, schedule, total_steps)`` makes the transformation from the run's
    ``optimizer`` config; ``labels(params)`` names the rule every leaf goes to (printed at start-up), for
    optimizers that route leaves; ``constant_lr``: the schedule is ignored and ``lr`` multiplies the update.
    Learned optimizers also have ``deploy(theta, lr, *, num_steps, weight_decay, adam_lr_mult)``, the
    transformation as trained with (``theta``: dict, path or None for the shipped weights)."""
    name: str
    build: Callable
    default_lr: float
    labels: Callable | None = None
    constant_lr: bool = False
    deploy: Callable | None = None
    weights: WeightFormat | None = None
    meta: MetaTraining | None = None


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformationExtraArgs
    schedule: optax.Schedule
    labels: Callable | None = None  # params -> tree of branch names, for optimizers that route leaves


def matrices_only(params):
    """Weight-decay mask: True for weight matrices and embeddings (ndim >= 2), False for biases and norms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(cfg, schedule, total_steps):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=matrices_only)


def _muon(cfg, schedule, total_steps):
    ratio = cfg.adam_lr_mult or 0.15
    return muon_lib.muon(schedule, lambda t: ratio * schedule(t), beta=cfg.muon_beta, nesterov=cfg.muon_nesterov,
                         weight_decay=cfg.weight_decay, adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps)


def _deploy_celo2(theta, lr, *, num_steps=None, weight_decay=0.0, adam_lr_mult=0.0):
    """Celo2 on matrices, AdamW at ``adam_lr_mult`` x lr (0: 20, the meta-training mult_1d) on the rest."""
    return celo2_lib.celo2(lr, theta, weight_decay=weight_decay, mult_1d=adam_lr_mult or 20.0)


def _deploy_celo2_base(theta, lr, *, num_steps=None, weight_decay=0.0, adam_lr_mult=0.0):
    return celo2_lib.celo2_base(lr, theta, weight_decay=weight_decay)


def _deploy_velo(theta, lr, *, num_steps=None, weight_decay=0.0, adam_lr_mult=0.0):
    """VeLO sets its own step sizes; ``lr`` multiplies its update (1 = VeLO as published). Weight decay as
    learned_optimization's wrapper: on the gradient and the loss."""
    return optax.chain(velo_lib.velo(theta, num_steps, weight_decay=weight_decay), optax.scale(lr))


def _learned_build(deploy: Callable, constant_lr: bool) -> Callable:
    def build(cfg, schedule, total_steps):
        return deploy(cfg.theta or None, cfg.lr if constant_lr else schedule, num_steps=total_steps,
                      weight_decay=cfg.weight_decay, adam_lr_mult=cfg.adam_lr_mult)
    return build


def _learned(name, deploy, default_lr, weights, meta, labels=None, constant_lr=False) -> OptimizerSpec:
    return OptimizerSpec(name, _learned_build(deploy, constant_lr), default_lr, labels, constant_lr, deploy,
                         weights, meta)


def _celo2_rule(orthogonalize: bool):
    def rule(theta):  # the learned step is subtracted: its update to add is -step
        return optax.chain(celo2_lib.scale_by_celo2(theta, orthogonalize=orthogonalize), optax.scale(-1.0))
    return rule


def _feature_rule(block: int):
    """A theta whose direction is feature block ``block``, channel 0 (``init_theta_from_feature``)."""
    return lambda key: celo2_lib.init_theta_from_feature(key, block=block, channel=0)


_CELO2_WEIGHTS = WeightFormat(celo2_lib.load_theta, celo2_lib.save_theta)

# Peak lrs (``optimizer.lr`` 0): AdamW's GPT-style 3e-3 (this project's small models), Muon's usual 0.02,
# the Celo2 rules' meta-training step size 1e-3 (their step has RMS 1, like Adam's scale), and VeLO as
# published (its lr multiplies the step it sizes itself). Meta-training: outer lrs of spec D.8 for the Celo2
# rules; VeLO has no PES recipe at this budget, 3e-4 was chosen by pilot runs (README); rule starts: Celo2
# from d = momentum 0.9 (block 3, Muon's direction after Newton-Schulz), Celo2-base from d = m / sqrt(v)
# (block 5, Adam's direction).
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec("adamw", _adamw, 3e-3),
    OptimizerSpec("muon", _muon, 0.02, labels=muon_lib.param_labels),
    _learned("celo2", _deploy_celo2, 1e-3, _CELO2_WEIGHTS,
             MetaTraining(_celo2_rule(True), True, celo2_lib.init_theta, _feature_rule(3), 1e-3, 5e-5),
             labels=celo2_lib.param_labels),
    _learned("celo2-base", _deploy_celo2_base, 1e-3, _CELO2_WEIGHTS,
             MetaTraining(_celo2_rule(False), False, celo2_lib.init_theta, _feature_rule(5), 1e-3, 1e-4)),
    _learned("velo", _deploy_velo, 1.0,
             WeightFormat(velo_lib.load_velo_theta, velo_lib.save_velo_theta),
             MetaTraining(lambda theta: velo_lib.scale_by_velo(theta, 1), False, velo_lib.init_velo_meta_theta,
                          None, 1.0, 3e-4),
             constant_lr=True),
]}
META_TRAINABLE = tuple(name for name, spec in REGISTRY.items() if spec.meta is not None)


def get(name: str) -> OptimizerSpec:
    """The record of optimizer ``name``, or a ValueError listing the known names."""
    if name not in REGISTRY:
        raise ValueError(f"optimizer.name={name!r} is not known; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def meta_trainable(name: str) -> OptimizerSpec:
    """The record of a learned optimizer that PES can meta-train, or a ValueError naming those that are."""
    if name not in META_TRAINABLE:
        raise ValueError(f"variant must be one of {list(META_TRAINABLE)}, got {name!r}")
    return REGISTRY[name]


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


def make_optimizer(cfg, total_steps: int) -> Optimizer:
    """Build the optimizer named ``cfg.name`` with its schedule and global-norm clipping (``cfg.clip_norm``);
    ``cfg.lr`` 0 means the optimizer's ``default_lr``."""
    spec = get(cfg.name)
    if cfg.lr < 0:
        raise ValueError(f"optimizer.lr={cfg.lr} must be positive (0: {cfg.name}'s default, {spec.default_lr:g})")
    if cfg.theta and spec.weights is None:
        raise ValueError(f"optimizer.theta={cfg.theta!r} is given, but {cfg.name} has no learned weights; remove it, "
                         f"or choose one of {', '.join(n for n, s in REGISTRY.items() if s.weights)}")
    if not cfg.lr:
        cfg = cfg.copy_and_resolve_references()
        cfg.lr = spec.default_lr
    if spec.constant_lr:
        schedule = optax.constant_schedule(cfg.lr)
    else:
        schedule = make_schedule(cfg.schedule, cfg.lr, total_steps, cfg.warmup_steps,
                                 cfg.min_lr_ratio, cfg.decay_fraction)
    tx = spec.build(cfg, schedule, total_steps)
    if cfg.clip_norm:
        if cfg.clip_norm < 0:
            raise ValueError(f"optimizer.clip_norm={cfg.clip_norm} must be >= 0 (0 disables clipping)")
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return Optimizer(optax.with_extra_args_support(tx), schedule, spec.labels)
