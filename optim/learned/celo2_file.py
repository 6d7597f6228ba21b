"""Celo2 weights ("theta") and the official ``theta.state`` file format (docs/weight_formats.md#celo2-weight-file).

A ``theta.state`` file is what ``flax.serialization.to_bytes`` writes for the tree

    {"ff_mod_stack": {"~": {w0__0..w0__13, b0, w1, b1, w2, b2}}}     (19 float32 arrays, 347 numbers)

i.e. one msgpack object: nested maps with str keys, each array an ExtType(code 1) whose payload is the
msgpack array [shape, dtype name, C-order little-endian bytes] (``optim.learned.msgpack_file``). This module reads,
validates and writes that tree. In memory, theta is the flat 19-key dict, in the creation order of
``THETA_SHAPES``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from infra.files import write_atomic
from optim.learned.core import FEATURE_WIDTHS
from optim.learned.msgpack_file import FileFormat, check_tree, read, tree_from_bytes, tree_to_bytes

HIDDEN = 8  # MLP width (two hidden layers)
OUTPUTS = 3  # direction, magnitude, unused

THETA_SHAPES = {
    **{f"w0__{i}": (w, HIDDEN) for i, w in enumerate(FEATURE_WIDTHS)},
    "b0": (HIDDEN,),
    "w1": (HIDDEN, HIDDEN),
    "b1": (HIDDEN,),
    "w2": (HIDDEN, OUTPUTS),
    "b2": (OUTPUTS,),
}
# The official meta-training's --optimizer values (its config.json) -> this project's optimizer names
OFFICIAL_OPTIMIZERS = {"celo2": "celo2", "celo2base": "celo2_base"}
TREE_PATH = ("ff_mod_stack", "~")  # where the 19 arrays sit in the file; "~" is Haiku's top-level scope


def _leading_axis_hint(got: tuple, expected: tuple) -> str:
    if len(got) > len(expected):
        return (" (an extra leading axis: this looks like a VeLO or Celo v1 checkpoint, whose ff_mod_stack has a"
                " leading param_inits axis; Celo2 cannot use it)")
    return ""


def check_theta(theta, source: str = "theta") -> None:
    """Raise ValueError unless ``theta`` has exactly the 19 keys of ``THETA_SHAPES`` with those shapes."""
    check_tree(theta, THETA_SHAPES, source, "Celo2", _leading_axis_hint)


def theta_from_bytes(buf: bytes, source: str = "theta.state") -> dict:
    """Parse and validate the bytes of a ``theta.state`` file into the flat 19-key dict of float32 arrays."""
    return theta_from_tree(tree_from_bytes(buf, source), source)


def theta_from_tree(tree, source: str = "theta.state") -> dict:
    """The validated flat 19-key theta of a decoded ``theta.state`` tree."""
    node = tree
    for depth, key in enumerate(TREE_PATH):
        if not isinstance(node, dict) or set(node) != {key}:
            where = "/".join(TREE_PATH[:depth]) or "top level"
            found = sorted(node) if isinstance(node, dict) else type(node).__name__
            hint = " (a VeLO checkpoint: Celo2 cannot use it)" if "lstm_init_state" in found else ""
            raise ValueError(f"{source}: expected the single key {key!r} at {where}, found {found}{hint}")
        node = node[key]
    check_theta(node, source)
    return {k: node[k] for k in THETA_SHAPES}


def theta_to_bytes(theta: dict) -> bytes:
    """Encode theta exactly as ``flax.serialization.to_bytes({"ff_mod_stack": {"~": theta}})`` does,
    with the keys in creation order (``THETA_SHAPES``)."""
    check_theta(theta)
    return tree_to_bytes({TREE_PATH[0]: {TREE_PATH[1]: {k: theta[k] for k in THETA_SHAPES}}})


def theta_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or the ``theta.state`` in it if it is a directory (a downloaded model repository)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "theta.state").is_file():
            raise ValueError(f"{path} is a directory without a theta.state file; give the weight file's path")
        return path / "theta.state"
    return path


def trained_as(path: str | os.PathLike) -> tuple[str, str] | None:
    """(variant, the config entry that says so) for the weights at ``path`` (file or directory), from the
    ``config.json`` beside the weight file: the official meta-training flags (``--optimizer``: celo2 or
    celo2base; other values are other learned optimizers) or this project's (``--variant``). None without one.

    In the official code (``celo/factory.py``) the flags that reach the rule are ``optimizer`` (Celo2 with
    Newton-Schulz and AdamW on 1-d leaves, or Celo2-base), ``step_mult`` (the learning rate it was trained at),
    ``weight_decay`` and ``regex_1d`` (the meta-training tasks' routing); only ``optimizer`` changes the rule's
    math for given weights, the others are hyperparameters of the harness.
    """
    config_path = theta_file(path).parent / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: unreadable config.json next to the weights ({e})") from e
    if "optimizer" in config:
        name = config["optimizer"]
        return OFFICIAL_OPTIMIZERS.get(name, name), f"{config_path}: optimizer={name!r}"
    if "variant" in config:
        return config["variant"], f"{config_path}: variant={config['variant']!r}"
    return None


def load_theta(path: str | os.PathLike, variant: str | None = None) -> dict:
    """Read a ``theta.state`` file (official Celo2 / Celo2-base weights or one written by ``save_theta``), or the
    one in a directory. With ``variant`` (this project's name of the rule the weights will run in), a
    ``config.json`` beside the file that
    says the weights were meta-trained as something else is an error naming it."""
    found = trained_as(path) if variant else None
    if found and found[0] != variant:
        trained, where = found
        fix = (f"use --config.optimizer.name={trained}" if trained in OFFICIAL_OPTIMIZERS.values()
               else "these are not Celo2 weights")
        raise ValueError(f"{theta_file(path)}: meta-trained as {trained} ({where}) but used as {variant}: Celo2 and "
                         f"Celo2-base differ in Newton-Schulz and routing, so the rule would not be the one the "
                         f"weights learned; {fix}")
    return read(theta_file(path), theta_from_bytes)


def save_theta(path: str | os.PathLike, theta: dict) -> None:
    """Write theta as a ``theta.state`` file (arrays cast to float32), atomically: tmp file + os.replace."""
    write_atomic(path, theta_to_bytes(theta))


def detect(tree) -> bool:
    """A decoded weight file is a Celo2 ``theta.state``: its only top-level key is ``ff_mod_stack``."""
    return isinstance(tree, dict) and set(tree) == {TREE_PATH[0]}


def describe(tree, path, source: str) -> dict:
    """``FileFormat.describe`` of a decoded ``theta.state`` (the optimizer from a ``config.json`` beside it)."""
    theta = theta_from_tree(tree, source)
    trained = trained_as(path)
    return dict(theta=theta, tree={TREE_PATH[0]: {TREE_PATH[1]: theta}}, layout="official",
                optimizer=None if trained is None else trained[0], details="" if trained is None else trained[1],
                extra={})


def encode(theta: dict, layout: str = "official", gen_id: str = "", step: int = 0) -> bytes:
    """``theta_to_bytes``; a ``theta.state`` has one layout, so ``gen_id`` and ``step`` have no place in it."""
    if layout != "official":
        raise ValueError(f"Celo2 theta.state has one layout, 'official'; --layout {layout} is for VeLO files")
    return theta_to_bytes(theta)


FORMAT = FileFormat("Celo2 theta.state", detect, describe, encode)
