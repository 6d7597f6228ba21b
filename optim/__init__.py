"""Optimizers by name (AdamW, Muon, Celo2, Celo2-base, VeLO: ``optim.registry``), learning-rate schedules and
the sharding of optimizer state. The learned optimizers, their weight files and their meta-training live in
``optim.learned``."""
from optim.registry import REGISTRY, Optimizer, OptimizerSpec, get, make_optimizer, resolve_defaults
from optim.schedules import SCHEDULES, make_schedule
from optim.sharding import state_specs

__all__ = ["REGISTRY", "Optimizer", "OptimizerSpec", "get", "make_optimizer", "resolve_defaults", "SCHEDULES",
           "make_schedule", "state_specs"]
