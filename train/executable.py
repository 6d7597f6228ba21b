"""A compiled train step saved to a file, and loaded by the trainer instead of compiling it again.

Compile once, run on the cluster: ``python -m tools.plan --gpu h100 --gpus 64 --save step.jaxexe`` (or
``--topology v5p-128``) compiles the run's train step for the target's devices on a machine without them and
writes it here; a run given ``--config.compiled_step=step.jaxexe`` loads it, so its first step does not wait
for XLA. The file is used only when it was compiled for the same program on devices like the run's: the
same ``key`` (below). Otherwise the run prints each difference and compiles as usual; a file that cannot be
read or loaded likewise. The diagnostics step (``diagnostics_every``) is always compiled by the run.

The file is a pickle of ``{"format", "key", "executable", "in_tree", "out_tree"}``; the executable is XLA's
serialized program (``jax.experimental.serialize_executable``). Loading one runs code it holds: load only
files you made.

``key`` = the jax and jaxlib versions, the devices (platform, kind, count, processes), the mesh, and every
config value the compiled program depends on: the model section (vocabulary resolved), the optimizer section
with the sha256 of its weight files, ``steps`` (the schedule), ``batch_size``, ``seq_len``, ``microbatches``,
``loss_chunk``, ``seed`` (dropout) and whether loss spikes are skipped. ``XLA_FLAGS`` is not part of it.
"""
from __future__ import annotations

import hashlib
import pickle

import jax
import jaxlib

from infra.files import exists, read_bytes, write_atomic
from train.resume import config_changes

FORMAT = 1


def _weights_digest(optimizer: dict) -> dict:
    """The optimizer section with each weight file's sha256 beside its path (a file changed in place is another
    program: its weights are constants of it)."""
    out = {}
    for name, value in optimizer.items():
        if isinstance(value, dict) and value.get("theta"):
            theta = value["theta"]
            value = {**value, "theta_sha256": hashlib.sha256(read_bytes(theta)).hexdigest() if exists(theta) else None}
        out[name] = value
    return out


def program_key(run) -> dict:
    """What decides the compiled train step of ``run`` (see the module docstring)."""
    cfg = run.cfg
    devices = list(run.mesh.devices.flat)
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
        "processes": len({d.process_index for d in devices}), "mesh": dict(run.mesh.shape),
        "model": cfg.model.to_dict(), "optimizer": _weights_digest(cfg.optimizer.to_dict()),
        **{k: cfg[k] for k in ("steps", "batch_size", "seq_len", "microbatches", "loss_chunk", "seed")},
        "skip_spikes": cfg.loss_spike.factor > 0,
    }


def differences(saved: dict, now: dict) -> list[str]:
    """``name: file X, run Y`` for every value of two keys that differs (``train.resume.config_changes``)."""
    return [f"{k}: file {a!r}, run {b!r}" for k, (a, b) in config_changes(saved, now).items()]


def save(path: str, compiled, key: dict) -> int:
    """Writes ``compiled`` (a ``jax.stages.Compiled`` train step) with its ``key`` to ``path``, atomically;
    returns the file's size in bytes."""
    from jax.experimental.serialize_executable import serialize

    try:
        payload, in_tree, out_tree = serialize(compiled)
    except (ValueError, NotImplementedError, AttributeError, TypeError, pickle.PicklingError) as e:
        raise ValueError(f"this compiled program cannot be saved ({e}); known case: cuDNN attention, whose "
                         "custom partitioning jax does not serialize (use --config.model.attention=pallas_gpu)") from e
    blob = pickle.dumps({"format": FORMAT, "key": key, "executable": payload, "in_tree": in_tree,
                         "out_tree": out_tree})
    write_atomic(path, blob)
    return len(blob)


def load(path: str, run):
    """(the train step of ``run`` loaded from ``path``, or None, and a line saying which and why)."""
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        saved = pickle.loads(read_bytes(path))
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"not a saved train step of format {FORMAT}")
    except FileNotFoundError:
        return None, f"compiled_step {path} does not exist: compiling the train step"
    except (ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ImportError) as e:
        return None, f"compiled_step {path} is unreadable ({e}): compiling the train step"
    diffs = differences(saved["key"], program_key(run))
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        return None, f"compiled_step {path} was compiled for another program or devices ({shown}): compiling"
    devices = list(run.mesh.devices.flat)
    try:
        step = deserialize_and_load(saved["executable"], saved["in_tree"], saved["out_tree"],
                                    backend=devices[0].client)
    except Exception as e:  # noqa: BLE001 (XLA's errors have no common type): the run compiles instead
        return None, f"compiled_step {path} does not load on these devices ({str(e)[:300]}): compiling"
    return step, f"train step loaded from {path} (compiled for {saved['key']['devices']} {saved['key']['device_kind']})"
