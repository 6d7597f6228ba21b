"""Learned-optimizer weight files: the msgpack encoding of ``flax.serialization``
(docs/weight_formats.md#the-msgpack-encoding), shared by the Celo2 (``optim.learned.celo2_file``) and VeLO
(``optim.learned.velo_file``) formats, and ``FileFormat``, what ``python -m optim.learned.weights`` needs to
know of each format.

A file is one msgpack object: nested maps with str keys, each array an ExtType(code 1) whose payload is the
msgpack array [shape, dtype name, C-order little-endian bytes]. Writing goes through
``flax.serialization.msgpack_serialize`` itself (on a tree built in the format's key order, so the bytes are
those of ``flax.serialization.to_bytes``). Reading decodes with an ext hook that validates every array
(float32, payload size) and ``check_tree`` validates the tree, so that a wrong file is refused with a
message that names the problem rather than failing later.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Callable

import flax.serialization
import msgpack
import numpy as np

_NDARRAY_EXT, _NPSCALAR_EXT = 1, 3  # flax's msgpack ExtType codes (2, a Python complex, never occurs)


class _BadArray(ValueError):
    """An array entry that is valid msgpack but not an ndarray of the stated shape."""


def _unpack_ext(code: int, data: bytes):
    """Arrays (code 1) and numpy scalars (code 3, e.g. the step of a wrapped checkpoint) as flax writes them;
    which dtype a weight may have is ``check_tree``'s business."""
    if code not in (_NDARRAY_EXT, _NPSCALAR_EXT):
        raise _BadArray(f"unsupported msgpack ExtType code {code} (weight files hold ndarrays, code 1)")
    shape, dtype, raw = msgpack.unpackb(data, raw=False)
    try:
        dtype = np.dtype(dtype).newbyteorder("<")
    except TypeError as e:
        raise _BadArray(f"array of unknown dtype {dtype!r}") from e
    if len(raw) != dtype.itemsize * int(np.prod(shape)):
        raise _BadArray(f"array payload has {len(raw)} bytes, shape {shape} of {dtype.name} needs "
                        f"{dtype.itemsize * int(np.prod(shape))}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return arr[()] if code == _NPSCALAR_EXT else arr


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


def tree_to_bytes(tree: Mapping, extra: Mapping | None = None) -> bytes:
    """Encode nested maps of arrays as ``flax.serialization.to_bytes`` does: float32, keys in ``tree``'s order
    (a fresh tree is serialised in place: flax's copy would go through jax tree ops, which sort the keys).
    ``extra``: top-level entries packed as they are (e.g. a checkpoint's ``step`` and ``gen_id``)."""
    def f32(node):
        if isinstance(node, Mapping):
            return {k: f32(v) for k, v in node.items()}
        return np.ascontiguousarray(node, dtype=np.float32)

    return flax.serialization.msgpack_serialize({**f32(tree), **(extra or {})}, in_place=True)


def check_tree(tree, shapes: Mapping, source: str, kind: str,
               shape_hint: Callable[[tuple, tuple], str] = lambda got, expected: "") -> None:
    """Raise ValueError unless ``tree`` has exactly the keys of the nested dict ``shapes`` and, at each leaf,
    an array of that shape; ``shape_hint(got, expected)`` may add a sentence to a shape error."""
    def check(node, spec, path):
        where = "/".join(path) or "top level"
        if not isinstance(spec, Mapping):
            got = "a dict" if isinstance(node, Mapping) else tuple(getattr(node, "shape", ()))
            if got != spec:
                hint = shape_hint(got, spec) if isinstance(got, tuple) else ""
                raise ValueError(f"{source}: {where} has shape {got}, expected {spec}{hint}")
            dtype = getattr(node, "dtype", None)
            if isinstance(node, np.ndarray) and dtype != np.float32:
                raise ValueError(f"{source}: {where} has dtype {dtype.name!r}; weight files hold float32 arrays only")
            return
        if not isinstance(node, Mapping):
            raise ValueError(f"{source}: {where} should be a dict with keys {list(spec)}, got {type(node).__name__}")
        missing, extra = [k for k in spec if k not in node], sorted(set(node) - set(spec))
        if missing or extra:
            raise ValueError(f"{source}: not a {kind} theta: " + (f"at {where}, " if path else "")
                             + f"missing keys {missing}, unexpected keys {extra}")
        for k, sub in spec.items():
            check(node[k], sub, path + (k,))

    check(tree, shapes, ())


def read(path: str | os.PathLike, parse: Callable[[bytes, str], dict]) -> dict:
    """``parse(bytes, source name)`` of the file at ``path``."""
    with open(path, "rb") as f:
        return parse(f.read(), os.fspath(path))


@dataclasses.dataclass(frozen=True)
class FileFormat:
    """One weight-file format, as ``python -m optim.learned.weights`` inspects and converts it
    (docs/weight_formats.md#the-weights-command).

    detect(tree) -> bool:  a decoded file (nested dicts of arrays) is in this format;
    describe(tree, path, source) -> dict: "theta" (validated, canonical order), "tree" (theta nested as the
        file holds it), "layout", "optimizer" (which optimizer the file says it belongs to, or None: any that
        uses this format), "details" (a short note, or ""), and "extra" (further header fields, or {});
    encode(theta, layout, gen_id, step) -> bytes: the file in ``layout``, one of ``layouts``.
    """
    kind: str
    detect: Callable
    describe: Callable
    encode: Callable
    layouts: tuple = ("official",)
