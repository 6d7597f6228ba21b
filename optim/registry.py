"""Every optimizer of the project by name: one ``OptimizerSpec`` record each, the only place that says how
an optimizer is built, which rule each parameter goes to, its default learning rate and settings, its weight
files and how it is meta-trained. Nothing else in the project dispatches on an optimizer's name.

The run's ``optimizer`` config holds the shared fields (name, lr, schedule, warmup_steps, min_lr_ratio,
decay_fraction, weight_decay, clip_norm) and one section per optimizer, ``optimizer.<name>``, whose defaults
are the record's ``settings``. ``resolve_defaults(cfg)`` fills in what the config leaves to the optimizer
(lr 0: its ``default_lr``; a learned section's empty ``theta``: its shipped weights); the trainer calls it
once when it loads the config. ``make_optimizer(cfg, total_steps)`` then returns an ``Optimizer(tx,
schedule, labels)``: ``tx`` is an ``optax.GradientTransformationExtraArgs`` (the train step always passes
``loss=`` so that optimizers that need the loss, like VeLO, receive it; the others ignore it) that already
includes global-norm clipping, and ``schedule(step)`` gives the learning rate used for logging.

    from optim.registry import REGISTRY, get
    get("celo2").default_lr            # 1e-3
    get("celo2").settings              # the defaults of optimizer.celo2
    get("velo").weights.shipped         # the shipped VeLO parameter file
    get("celo2_base").meta.outer_lr     # PES outer lr
"""
from __future__ import annotations

import dataclasses
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import optax

from optim import muon as muon_lib
from optim.learned import celo2 as celo2_lib
from optim.learned import celo2_file, velo_file
from optim.learned import velo as velo_lib
from optim.learned.core import WEIGHTS_DIR
from optim.learned.msgpack_file import FileFormat
from optim.orthogonalize import REPLICATED, Placement
from optim.schedules import make_schedule

UNRESOLVED = "must be resolved first: registry.resolve_defaults / load the config through train"


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A learned optimizer's weight file: ``load(path) -> theta`` (validated) and ``save(path, theta)`` (its
    official format, atomically); ``shipped``: the weights used when ``optimizer.<name>.theta`` is empty
    (``optim/learned/weights/<name>.state``); ``file``: the format as ``python -m optim.learned.weights``
    inspects and converts it (shared by the optimizers whose weights have that format)."""
    load: Callable
    save: Callable
    shipped: Path
    file: FileFormat


@dataclasses.dataclass(frozen=True)
class MetaTraining:
    """How PES meta-trains a learned optimizer (``optim.learned.meta``).

    rule(theta):  the raw learned rule, whose update is *added* to the params (no learning rate);
    adam_1d:      the leaves matching ``--regex_1d`` (biases) go to the meta-training Adam instead;
    init(key):    the theta a run starts from with ``--init random``;
    rule_init:    ``--init rule``: a hand-designed rule the network represents exactly, or None;
    rule_doc:     what that hand-designed rule is (for ``--help``);
    step_mult:    default inner lr (the rule's update times this);  outer_lr: default PES outer lr.
    """
    rule: Callable
    adam_1d: bool
    init: Callable
    rule_init: Callable | None
    rule_doc: str
    step_mult: float
    outer_lr: float


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer.

    build(section, common, lr, total_steps, placement=REPLICATED) -> optax transformation (without clipping): ``section``
      is the optimizer's own config section (a mapping with the keys of ``settings``; a learned optimizer's
      ``theta`` is a weight-file path or a theta dict), ``common`` the shared fields (``weight_decay``),
      ``lr`` the learning rate (a schedule, or a float for ``constant_lr`` optimizers), ``total_steps``
      the planned number of steps (VeLO's training-fraction features; None where the rule does not need it)
      and ``placement`` where Newton-Schulz runs (``optim.orthogonalize``; used where ``orthogonalizes``).
    settings: the defaults of the config section ``optimizer.<name>`` (configs/base.py holds the same).
    labels(params): names the rule every leaf goes to (printed at start-up), for optimizers that route
      leaves; constant_lr: the schedule is ignored and ``lr`` multiplies the update.
    """
    name: str
    build: Callable
    default_lr: float
    settings: dict
    labels: Callable | None = None
    constant_lr: bool = False
    orthogonalizes: bool = False  # runs Newton-Schulz on matrices (``optimizer.orthogonalize`` applies)
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


def _theta(section, weights: WeightFormat):
    """The section's theta: a dict as given, a path read by the record's ``weights.load``."""
    theta = section["theta"]
    if isinstance(theta, (str, os.PathLike)):
        if not str(theta):
            raise ValueError(f"an empty theta {UNRESOLVED}")
        return weights.load(theta)
    return theta


def _adamw(s, common, lr, total_steps, placement=REPLICATED):
    return optax.adamw(lr, b1=s["b1"], b2=s["b2"], eps=s["eps"], weight_decay=common["weight_decay"],
                       mask=matrices_only)


def _muon(s, common, lr, total_steps, placement=REPLICATED):
    """Muon on matrices, AdamW at ``adam_lr_mult`` x lr on the rest (``optim.muon``)."""
    ratio = s["adam_lr_mult"]
    return muon_lib.muon(lr, lambda t: ratio * lr(t), beta=s["beta"], nesterov=s["nesterov"],
                         weight_decay=common["weight_decay"], adam_b1=s["b1"], adam_b2=s["b2"], eps=s["eps"],
                         placement=placement)


def _celo2(s, common, lr, total_steps, placement=REPLICATED, *, weights):
    """Celo2 on matrices, AdamW at ``adam_lr_mult`` x lr (20: the meta-training mult_1d) on the rest."""
    return celo2_lib.celo2(lr, _theta(s, weights), weight_decay=common["weight_decay"], mult_1d=s["adam_lr_mult"],
                           b1=s["b1"], b2=s["b2"], eps=s["eps"], placement=placement)


def _celo2_base(s, common, lr, total_steps, placement=REPLICATED, *, weights):
    return celo2_lib.celo2_base(lr, _theta(s, weights), weight_decay=common["weight_decay"])


def _velo(s, common, lr, total_steps, placement=REPLICATED, *, weights):
    """VeLO sets its own step sizes; ``lr`` multiplies its update (1 = VeLO as published). Weight decay as
    learned_optimization's wrapper: on the gradient and the loss."""
    return optax.chain(velo_lib.velo(_theta(s, weights), total_steps, weight_decay=common["weight_decay"]),
                       optax.scale(lr))


def _celo2_rule(orthogonalize: bool):
    def rule(theta):  # the learned step is subtracted: its update to add is -step
        return optax.chain(celo2_lib.scale_by_celo2(theta, orthogonalize=orthogonalize), optax.scale(-1.0))
    return rule


def _feature_rule(block: int):
    """A theta whose direction is feature block ``block``, channel 0 (``init_theta_from_feature``)."""
    return lambda key: celo2_lib.init_theta_from_feature(key, block=block, channel=0)


def _weights(name: str, load: Callable, save: Callable, file: FileFormat) -> WeightFormat:
    return WeightFormat(load, save, WEIGHTS_DIR / f"{name}.state", file)


_CELO2_WEIGHTS = _weights("celo2", partial(celo2_file.load_theta, variant="celo2"), celo2_file.save_theta,
                          celo2_file.FORMAT)
_CELO2_BASE_WEIGHTS = _weights("celo2_base", partial(celo2_file.load_theta, variant="celo2_base"),
                               celo2_file.save_theta, celo2_file.FORMAT)
_VELO_WEIGHTS = _weights("velo", velo_file.load_velo_theta, velo_file.save_velo_theta, velo_file.FORMAT)
_ADAM = dict(b1=0.9, b2=0.95, eps=1e-8)

# Peak lrs (``optimizer.lr`` 0): AdamW's GPT-style 3e-3 (this project's small models), Muon's usual 0.02,
# the Celo2 rules' meta-training step size 1e-3 (their step has RMS 1, like Adam's scale), and VeLO as
# published (its lr multiplies the step it sizes itself). Meta-training: outer lrs of
# docs/meta_training.md#outer-optimizer for the Celo2 rules; VeLO has no PES recipe at this budget, 3e-4 was
# chosen by pilot runs; rule starts: Celo2 from d = momentum 0.9 (block 3, Muon's direction after
# Newton-Schulz), Celo2-base from d = m / sqrt(v) (block 5, Adam's direction).
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec("adamw", _adamw, 3e-3, dict(_ADAM)),
    OptimizerSpec("muon", _muon, 0.02, dict(beta=0.95, nesterov=True, adam_lr_mult=0.15, **_ADAM),
                  labels=muon_lib.param_labels, orthogonalizes=True),
    OptimizerSpec("celo2", partial(_celo2, weights=_CELO2_WEIGHTS), 1e-3, dict(theta="", adam_lr_mult=20.0, **_ADAM),
                  labels=celo2_lib.param_labels, orthogonalizes=True, weights=_CELO2_WEIGHTS,
                  meta=MetaTraining(_celo2_rule(True), True, celo2_lib.init_theta, _feature_rule(3),
                                    "d = momentum 0.9, i.e. Muon's direction after Newton-Schulz", 1e-3, 5e-5)),
    OptimizerSpec("celo2_base", partial(_celo2_base, weights=_CELO2_BASE_WEIGHTS), 1e-3, dict(theta=""),
                  weights=_CELO2_BASE_WEIGHTS,
                  meta=MetaTraining(_celo2_rule(False), False, celo2_lib.init_theta, _feature_rule(5),
                                    "d = m / sqrt(v), Adam's direction", 1e-3, 1e-4)),
    OptimizerSpec("velo", partial(_velo, weights=_VELO_WEIGHTS), 1.0, dict(theta=""), constant_lr=True,
                  weights=_VELO_WEIGHTS,
                  meta=MetaTraining(lambda theta: velo_lib.scale_by_velo(theta, 1), False,
                                    velo_lib.init_velo_meta_theta, None, "", 1.0, 3e-4)),
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


def weight_files() -> dict[FileFormat, list[str]]:
    """Each weight-file format with the names of the optimizers whose weights have it."""
    out = {}
    for name, spec in REGISTRY.items():
        if spec.weights is not None:
            out.setdefault(spec.weights.file, []).append(name)
    return out


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


def resolve_defaults(cfg):
    """A copy of the ``optimizer`` config ``cfg`` with what it leaves to the optimizer filled in: ``lr`` 0 ->
    the record's ``default_lr``; an empty ``optimizer.<name>.theta`` -> the absolute path of the record's
    shipped weights (``weights.shipped``). ValueError for an unknown name."""
    spec = get(cfg.name)
    cfg = cfg.copy_and_resolve_references()
    if not cfg.lr:
        cfg.lr = spec.default_lr
    if spec.weights is not None and not cfg[spec.name].theta:
        cfg[spec.name].theta = str(spec.weights.shipped.resolve())
    return cfg


def _check(cfg, spec: OptimizerSpec) -> None:
    if cfg.lr < 0:
        raise ValueError(f"optimizer.lr={cfg.lr} must be positive (0: {cfg.name}'s default, {spec.default_lr:g})")
    if not cfg.lr:
        raise ValueError(f"optimizer.lr=0 {UNRESOLVED}")
    if "theta" in spec.settings and not cfg[spec.name].theta:
        raise ValueError(f"optimizer.{spec.name}.theta='' {UNRESOLVED}")
    if cfg.clip_norm < 0:
        raise ValueError(f"optimizer.clip_norm={cfg.clip_norm} must be >= 0 (0 disables clipping)")


def make_optimizer(cfg, total_steps: int, placement: Placement = REPLICATED) -> Optimizer:
    """Build the optimizer named ``cfg.name`` (a resolved config: ``resolve_defaults``) from its section
    ``cfg.<name>`` and the shared fields, with its schedule and global-norm clipping (``cfg.clip_norm``);
    ``placement``: where an orthogonalising optimizer runs Newton-Schulz (``optim.orthogonalize``)."""
    spec = get(cfg.name)
    _check(cfg, spec)
    if spec.constant_lr:
        schedule = optax.constant_schedule(cfg.lr)
    else:
        schedule = make_schedule(cfg.schedule, cfg.lr, total_steps, cfg.warmup_steps,
                                 cfg.min_lr_ratio, cfg.decay_fraction)
    common = {k: v for k, v in cfg.items() if k not in REGISTRY}
    tx = spec.build(cfg[spec.name], common, cfg.lr if spec.constant_lr else schedule, total_steps, placement)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return Optimizer(optax.with_extra_args_support(tx), schedule, spec.labels)
