"""The optimizer registry: each record's settings are its config section's defaults, defaults are resolved in
one place, a configured optimizer is built by its record's one build function, and nothing else in
``optim`` dispatches on an optimizer's name."""
import ast
import pathlib

import jax.numpy as jnp
import pytest

from configs.base import base_config
from optim import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_config_sections_are_the_records_settings(name):
    assert base_config().optimizer[name].to_dict() == registry.get(name).settings


def test_config_has_a_section_per_optimizer_and_no_other():
    cfg = base_config().optimizer
    sections = {k for k, v in cfg.items() if hasattr(v, "items")}
    assert sections == set(registry.REGISTRY)


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_resolve_defaults(name):
    cfg = base_config().optimizer
    cfg.name = name
    resolved = registry.resolve_defaults(cfg)
    spec = registry.get(name)
    assert resolved.lr == spec.default_lr and cfg.lr == 0.0  # a copy
    if spec.weights is not None:
        assert resolved[name].theta == str(spec.weights.shipped.resolve()) and cfg[name].theta == ""
        assert pathlib.Path(resolved[name].theta).is_absolute() and spec.weights.shipped.is_file()
    cfg.lr = 5e-4
    assert registry.resolve_defaults(cfg).lr == 5e-4  # a given lr stays


def test_make_optimizer_needs_a_resolved_config():
    cfg = base_config().optimizer
    with pytest.raises(ValueError, match=r"optimizer.lr=0 must be resolved first: registry.resolve_defaults"):
        registry.make_optimizer(cfg, 10)
    cfg.update(name="velo", lr=1.0)
    with pytest.raises(ValueError, match=r"optimizer.velo.theta='' must be resolved first"):
        registry.make_optimizer(cfg, 10)


@pytest.mark.parametrize("field,value,match", [
    ("name", "sgd", "'sgd' is not known; choose one of: adamw, muon, celo2, celo2_base, velo"),
    ("lr", -1.0, "optimizer.lr=-1.0 must be positive"),
    ("clip_norm", -1.0, "optimizer.clip_norm=-1.0 must be >= 0"),
])
def test_bad_values(field, value, match):
    cfg = registry.resolve_defaults(base_config().optimizer)
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        registry.make_optimizer(cfg, 10)


@pytest.mark.parametrize("name", ["adamw", "muon", "celo2", "celo2_base", "velo"])
def test_every_record_builds_and_steps(name):
    cfg = base_config().optimizer
    cfg.update(name=name, warmup_steps=0)  # a nonzero lr at step 0
    opt = registry.make_optimizer(registry.resolve_defaults(cfg), 10)
    params = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6), "embed": jnp.ones((5, 4))}
    grads = {k: 0.1 * jnp.ones_like(v) for k, v in params.items()}
    updates, _ = opt.tx.update(grads, opt.tx.init(params), params, loss=jnp.float32(2.0))
    assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0)) for u in updates.values())
    assert float(opt.schedule(0)) >= 0.0


def test_no_dispatch_on_optimizer_names_outside_the_registry():
    """No ``==``/``in`` comparison against an optimizer's name in optim/ except in optim/registry.py."""
    names = set(registry.REGISTRY)
    found = []
    for path in (ROOT / "optim").rglob("*.py"):
        if path.name == "registry.py" and path.parent.name == "optim":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts if isinstance(c.value, str)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.IfExp) and isinstance(node.body, ast.Constant) and node.body.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
