"""Celo2 weights ("theta") and the official ``theta.state`` file format.

A ``theta.state`` file is what ``flax.serialization.to_bytes`` writes for the tree

    {"ff_mod_stack": {"~": {w0__0..w0__13, b0, w1, b1, w2, b2}}}     (19 float32 arrays, 347 numbers)

i.e. one msgpack object: nested maps with str keys, each array an ExtType(code 1) whose payload is the
msgpack array [shape, dtype name, C-order little-endian bytes] (``optim.weight_files``). This module reads,
validates and writes that tree. In memory, theta is the flat 19-key dict, in the creation order of
``THETA_SHAPES``.
"""
from __future__ import annotations

import os

from infra.files import write_atomic
from optim.weight_files import check_tree, read, tree_from_bytes, tree_to_bytes

# Widths of the 14 input feature blocks, in the order of the first-layer keys w0__0..w0__13.
FEATURE_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
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
    tree = tree_from_bytes(buf, source)
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


def load_theta(path: str | os.PathLike) -> dict:
    """Read a ``theta.state`` file (official Celo2 / Celo2-base weights or one written by ``save_theta``)."""
    return read(path, theta_from_bytes)


def save_theta(path: str | os.PathLike, theta: dict) -> None:
    """Write theta as a ``theta.state`` file (arrays cast to float32), atomically: tmp file + os.replace."""
    write_atomic(path, theta_to_bytes(theta))
