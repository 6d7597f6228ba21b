"""Optimizers by name (AdamW, Muon, Celo2, Celo2-base, VeLO), learning-rate schedules and the sharding of
optimizer state. Learned optimizers live in ``optim.celo2`` and ``optim.velo``; meta-training in ``optim.meta``."""
from optim.registry import REGISTRY, Optimizer, OptimizerSpec, get, make_optimizer
from optim.schedules import SCHEDULES, make_schedule
from optim.sharding import state_specs

__all__ = ["REGISTRY", "Optimizer", "OptimizerSpec", "get", "make_optimizer", "SCHEDULES", "make_schedule", "state_specs"]
