"""Celo2 weights ("theta") and the official ``theta.state`` file format.

A ``theta.state`` file is what ``flax.serialization.to_bytes`` writes for the tree

    {"ff_mod_stack": {"~": {w0__0..w0__13, b0, w1, b1, w2, b2}}}     (19 float32 arrays, 347 numbers)

i.e. one msgpack object: nested maps with str keys, each array an ExtType(code 1) whose payload is the
msgpack array [shape, dtype name, C-order little-endian bytes]. This module reads and writes it with
plain ``msgpack`` (no flax or haiku needed) and validates what it reads. In memory, theta is the flat
19-key dict, in the creation order of ``THETA_SHAPES``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import msgpack
import numpy as np

from infra.files import write_atomic

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
_NDARRAY_EXT = 1  # flax's msgpack ExtType code for ndarray (2 = complex, 3 = numpy scalar: never used here)


def check_theta(theta, source: str = "theta") -> None:
    """Raise ValueError unless ``theta`` has exactly the 19 keys of ``THETA_SHAPES`` with those shapes."""
    if not isinstance(theta, Mapping):
        raise ValueError(f"{source}: expected a dict of 19 arrays, got {type(theta).__name__}")
    missing = [k for k in THETA_SHAPES if k not in theta]
    extra = sorted(set(theta) - set(THETA_SHAPES))
    if missing or extra:
        raise ValueError(f"{source}: not a Celo2 theta: missing keys {missing}, unexpected keys {extra}")
    for k, shape in THETA_SHAPES.items():
        got = tuple(getattr(theta[k], "shape", ()))
        if got != shape:
            hint = ""
            if len(got) > len(shape):
                hint = (" (an extra leading axis: this looks like a VeLO or Celo v1 checkpoint, whose"
                        " ff_mod_stack has a leading param_inits axis; Celo2 cannot use it)")
            raise ValueError(f"{source}: {k} has shape {got}, expected {shape}{hint}")


class _BadArray(ValueError):
    """An array entry that is valid msgpack but not a float32 ndarray of the stated shape."""


def _unpack_ext(code: int, data: bytes):
    if code != _NDARRAY_EXT:
        raise _BadArray(f"unsupported msgpack ExtType code {code} (only 1 = ndarray occurs in theta.state)")
    shape, dtype, raw = msgpack.unpackb(data, raw=False)
    if dtype != "float32":
        raise _BadArray(f"array of dtype {dtype!r}; theta.state holds float32 arrays only")
    arr = np.frombuffer(raw, dtype="<f4")
    if arr.size != int(np.prod(shape)):
        raise _BadArray(f"array payload has {arr.size} floats, shape {shape} needs {int(np.prod(shape))}")
    return arr.reshape(shape).copy()


def tree_from_bytes(buf: bytes, source: str, kind: str = "theta.state") -> dict:
    """Decode a flax-msgpack weight file (nested maps of float32 ndarrays) without validating its tree."""
    try:
        return msgpack.unpackb(buf, raw=False, ext_hook=_unpack_ext, strict_map_key=True)
    except _BadArray as e:
        raise ValueError(f"{source}: {e}") from e
    except ValueError as e:  # msgpack's own errors (truncated, extra data, bad format) are ValueErrors too
        raise ValueError(f"{source}: not a valid msgpack {kind} file ({e})") from e
    except Exception as e:  # e.g. a TypeError from an ext payload of the wrong layout
        raise ValueError(f"{source}: corrupt {kind} file ({type(e).__name__}: {e})") from e


def tree_to_bytes(tree: Mapping) -> bytes:
    """Encode nested maps of arrays exactly as ``flax.serialization.to_bytes`` does (float32, given key order)."""
    def pack(node):
        if isinstance(node, Mapping):
            return {k: pack(v) for k, v in node.items()}
        a = np.ascontiguousarray(node, dtype=np.float32)
        return msgpack.ExtType(_NDARRAY_EXT, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes()]))

    return msgpack.packb(pack(tree))


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
    with open(path, "rb") as f:
        return theta_from_bytes(f.read(), source=os.fspath(path))


def save_theta(path: str | os.PathLike, theta: dict) -> None:
    """Write theta as a ``theta.state`` file (arrays cast to float32), atomically: tmp file + os.replace."""
    write_atomic(path, theta_to_bytes(theta))
