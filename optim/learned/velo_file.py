"""VeLO weights ("theta") and the official VeLO parameter-file format (docs/weight_formats.md#velo-parameter-file).

The file is what ``flax.serialization.to_bytes`` writes for the theta of learned_optimization's
``HyperV2(lstm_hidden_size=512, param_inits=256)``, in the msgpack encoding of ``theta.state``
(docs/weight_formats.md#the-msgpack-encoding):

    {"lstm_init_state": {"hidden": (1, H), "cell": (1, H)},                 H = lstm_hidden_size = 512
     "rnn_params": {"linear":          {"w": (F, H), "b": (H,)},            F = 30 per-tensor features
                    "linear_1":        {"w": (F, H), "b": (H,)},
                    "linear_2":        {"w": (F, H), "b": (H,)},
                    "rnn/linear":      {"w": (2H, 4H), "b": (4H,)},         the LSTM's gate Linear
                    "rnn_to_controls": {"w": (H, K), "b": (K,)},            K = param_inits = 256
                    "step_size":       {"w": (H, 1), "b": (1,)}},
     "ff_mod_stack": {"~": {w0__i: (K, k_i, 4) for the 14 feature blocks, b0: (K, 4), w1: (K, 4, 4),
                            b1: (K, 4), w2: (K, 4, 3), b2: (K, 3)}}}

Names are Haiku's: top-level Linears are "linear", "linear_1", ...; "~" holds parameters created outside any
module. A module created inside another module's ``__call__`` is named "<parent>/<child>", one created in
its ``__init__`` "<parent>/~/<child>": ``hk.LSTM`` ("rnn") creates its gate Linear when called, so the key is
"rnn/linear". ``lstm_init_state`` is a Haiku ``LSTMState`` namedtuple, which flax writes as a map of its
fields. In memory theta is this nested dict of float32 arrays, keys in the creation order above; files are
read by key name, whatever their order.

Layouts read (``velo_layout``): "official" (the bare tree above); "wrapped", the ``ParameterCheckpoint``
that learned_optimization's outer training saves, ``{"params": theta, "gen_id": str, "step": int}``; and
"legacy", the bare tree with the gate Linear under "rnn/~/linear", as this project wrote it before
2026-11-29. Files are written "official" (or "wrapped" on request).

F = 30, not the 28 that a ``var_rms`` of width 1 would give (docs/learned_optimizers.md#velo). The official feature code
computes ``var_rms = mean((rms - mean_m)^2)`` with rms of width 1 and mean_m of width 3, which broadcasts
to width 3, so the features are fraction_left 9 + loss 9 + mean_rms 1 + rank 5 + var_m 3 + var_rms 3 = 30
(``HyperV2.init`` sizes the mixing Linears from that shape; PyTorch ports of the official weights use 30).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from infra.files import write_atomic
from optim.learned.core import FEATURE_WIDTHS
from optim.learned.msgpack_file import FileFormat, check_tree, read, tree_from_bytes, tree_to_bytes

LSTM_HIDDEN = 512  # official lstm_hidden_size
PARAM_INITS = 256  # official number of stored MLP weight sets ("param_inits")
FF_HIDDEN = 4  # per-parameter MLP width (two hidden layers)
FF_OUTPUTS = 3  # direction, magnitude, unused
TENSOR_FEATURES = 9 + 9 + 1 + 5 + 3 + 3  # per-tensor LSTM inputs (see the module docstring)
MIXING_LINEARS = ("linear", "linear_1", "linear_2")  # "linear" is computed and discarded upstream
LSTM_LINEAR = "rnn/linear"
LEGACY_LSTM_LINEAR = "rnn/~/linear"
WRAPPED_KEYS = ("params", "gen_id", "step")  # learned_optimization's ParameterCheckpoint
LAYOUTS = ("official", "wrapped", "legacy")


def velo_theta_shapes(param_inits: int = PARAM_INITS, lstm_hidden_size: int = LSTM_HIDDEN) -> dict:
    """The nested dict of array shapes of a VeLO theta (module docstring), in creation order."""
    H, K = lstm_hidden_size, param_inits

    def linear(n_in, n_out):
        return {"w": (n_in, n_out), "b": (n_out,)}

    ff = {f"w0__{i}": (K, w, FF_HIDDEN) for i, w in enumerate(FEATURE_WIDTHS)}
    ff.update(b0=(K, FF_HIDDEN), w1=(K, FF_HIDDEN, FF_HIDDEN), b1=(K, FF_HIDDEN), w2=(K, FF_HIDDEN, FF_OUTPUTS),
              b2=(K, FF_OUTPUTS))
    return {
        "lstm_init_state": {"hidden": (1, H), "cell": (1, H)},
        "rnn_params": {**{name: linear(TENSOR_FEATURES, H) for name in MIXING_LINEARS},
                       LSTM_LINEAR: linear(2 * H, 4 * H),
                       "rnn_to_controls": linear(H, K),
                       "step_size": linear(H, 1)},
        "ff_mod_stack": {"~": ff},
    }


def count_params(tree) -> int:
    """Number of numbers in a theta, or in a tree of shapes as given by ``velo_theta_shapes``."""
    if isinstance(tree, Mapping):
        return sum(count_params(v) for v in tree.values())
    return math.prod(tree) if isinstance(tree, tuple) else math.prod(np.shape(tree))


def check_velo_theta(theta, source: str = "theta", *, param_inits: int = PARAM_INITS,
                     lstm_hidden_size: int = LSTM_HIDDEN) -> None:
    """Raise ValueError unless ``theta`` has exactly the keys and shapes of ``velo_theta_shapes``."""
    if isinstance(theta, Mapping) and set(theta) == {"ff_mod_stack"}:
        raise ValueError(f"{source}: this is a Celo2 / Celo v1 theta (only 'ff_mod_stack', no LSTM "
                         "hyper-network): VeLO needs lstm_init_state, rnn_params and ff_mod_stack. Load Celo2 "
                         "weights with optim.learned.celo2.load_theta")
    check_tree(theta, velo_theta_shapes(param_inits, lstm_hidden_size), source, "VeLO",
               lambda got, expected: f" (VeLO with param_inits={param_inits}, lstm_hidden_size={lstm_hidden_size})")


def _ordered(tree, shapes):
    """``tree``'s arrays in the key order of ``shapes`` (the canonical creation order)."""
    if isinstance(shapes, Mapping):
        return {k: _ordered(tree[k], sub) for k, sub in shapes.items()}
    return tree


def velo_sizes(theta, source: str = "theta") -> dict:
    """{param_inits, lstm_hidden_size} of a (bare, official) VeLO theta, read off its arrays."""
    try:
        return dict(param_inits=theta["ff_mod_stack"]["~"]["b0"].shape[0],
                    lstm_hidden_size=theta["lstm_init_state"]["hidden"].shape[-1])
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{source}: not a VeLO theta ({type(e).__name__}: {e})") from e


def velo_layout(tree) -> str:
    """Which layout (``LAYOUTS``) a decoded VeLO file has; raises ValueError for none of them."""
    if isinstance(tree, Mapping) and "params" in tree and set(tree) <= set(WRAPPED_KEYS):
        return "wrapped"
    rnn = tree.get("rnn_params") if isinstance(tree, Mapping) else None
    if isinstance(rnn, Mapping) and LEGACY_LSTM_LINEAR in rnn and LSTM_LINEAR not in rnn:
        return "legacy"
    return "official"


def unwrap(tree, source: str = "VeLO parameter file") -> tuple[dict, str]:
    """(the bare official theta tree, the layout it was in) of a decoded VeLO file."""
    layout = velo_layout(tree)
    if layout == "wrapped":
        inner, inner_layout = unwrap(tree["params"], f"{source} (params)")
        if inner_layout == "wrapped":
            raise ValueError(f"{source}: a checkpoint wrapped twice; not a layout the official code writes")
        return inner, layout
    if layout == "legacy":
        rnn = {(LSTM_LINEAR if k == LEGACY_LSTM_LINEAR else k): v for k, v in tree["rnn_params"].items()}
        return {**tree, "rnn_params": rnn}, layout
    return tree, layout


def velo_theta_from_bytes(buf: bytes, source: str = "VeLO parameter file", *, param_inits: int = PARAM_INITS,
                          lstm_hidden_size: int = LSTM_HIDDEN) -> dict:
    """Parse and validate the bytes of a VeLO parameter file (any of ``LAYOUTS``) into the nested dict of
    float32 arrays, official names, creation order."""
    bare, _ = unwrap(tree_from_bytes(buf, source, kind="VeLO parameter"), source)
    return velo_theta_from_tree(bare, source, param_inits=param_inits, lstm_hidden_size=lstm_hidden_size)


def velo_theta_from_tree(bare, source: str = "VeLO parameter file", *, param_inits: int = PARAM_INITS,
                         lstm_hidden_size: int = LSTM_HIDDEN) -> dict:
    """The validated theta (creation order) of a decoded, unwrapped (``unwrap``) VeLO tree."""
    check_velo_theta(bare, source, param_inits=param_inits, lstm_hidden_size=lstm_hidden_size)
    return _ordered(bare, velo_theta_shapes(param_inits, lstm_hidden_size))


def velo_theta_to_bytes(theta: dict, layout: str = "official", gen_id: str = "", step: int = 0) -> bytes:
    """Encode theta exactly as ``flax.serialization.to_bytes`` does (arrays cast to float32), keys in
    theta's order: the bare official tree, or with ``layout="wrapped"`` learned_optimization's
    ``ParameterCheckpoint(params=theta, gen_id, step)``. The shapes are validated against theta's own
    param_inits and lstm_hidden_size."""
    if layout not in ("official", "wrapped"):
        raise ValueError(f"VeLO files are written in layout 'official' or 'wrapped', not {layout!r}")
    check_velo_theta(theta, **velo_sizes(theta))
    if layout == "official":
        return tree_to_bytes(theta)
    return tree_to_bytes({"params": theta}, extra={"gen_id": gen_id, "step": int(step)})


def load_velo_theta(path: str | os.PathLike, *, param_inits: int = PARAM_INITS,
                    lstm_hidden_size: int = LSTM_HIDDEN) -> dict:
    """Read a VeLO parameter file (the official one, or one written by ``save_velo_theta``)."""
    return read(path, lambda buf, source: velo_theta_from_bytes(buf, source, param_inits=param_inits,
                                                                lstm_hidden_size=lstm_hidden_size))


def save_velo_theta(path: str | os.PathLike, theta: dict, layout: str = "official") -> None:
    """Write theta as a VeLO parameter file (``velo_theta_to_bytes``), atomically: tmp file + os.replace."""
    write_atomic(path, velo_theta_to_bytes(theta, layout))


def detect(tree) -> bool:
    """A decoded weight file is a VeLO parameter file (bare, legacy or wrapped)."""
    return isinstance(tree, dict) and ("lstm_init_state" in tree or "params" in tree)


def describe(tree, path, source: str) -> dict:
    """``FileFormat.describe`` of a decoded VeLO parameter file, in whichever of ``LAYOUTS`` it is."""
    bare, layout = unwrap(tree, source)
    sizes = velo_sizes(bare, source)
    theta = velo_theta_from_tree(bare, source, **sizes)
    return dict(theta=theta, tree={"params": theta} if layout == "wrapped" else theta, layout=layout,
                optimizer=None, details=f"param_inits {sizes['param_inits']}, lstm_hidden_size "
                                        f"{sizes['lstm_hidden_size']}",
                extra=dict(gen_id=tree.get("gen_id"), step=tree.get("step")) if layout == "wrapped" else {})


FORMAT = FileFormat("VeLO parameter file", detect, describe, velo_theta_to_bytes, ("official", "wrapped"))
