"""The device mesh ('data', 'fsdp', 'tensor') and the checks that reject configs that cannot work."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from models import MESH_AXES


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    """Resolve the configured sizes (one may be -1) against the device count, or explain why not."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {desc}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {desc}: sizes must be positive (or -1 for 'the rest')")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {desc}: {n_devices} devices are not divisible by {known}; "
                             f"change --config.mesh.* so the fixed axes divide the device count")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {desc} needs {math.prod(sizes)} devices but {n_devices} are available; "
                         f"set --config.mesh.* so the sizes multiply to {n_devices} (one may be -1)")
    return tuple(sizes)


def build_mesh(mesh_cfg, devices=None) -> Mesh | AbstractMesh:
    """GSPMD-style mesh (Auto axes) over all devices, process-major so each host's devices are adjacent.

    ``devices`` may be a number: an ``AbstractMesh`` of that many devices that are not here (shapes and
    shardings of a run on them can be worked out, nothing can be compiled).
    """
    devices = jax.devices() if devices is None else devices
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if isinstance(devices, int):
        return AbstractMesh(mesh_shape(mesh_cfg, devices), MESH_AXES, axis_types=axis_types)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def check_divisibility(abstract_params, specs, mesh: Mesh) -> None:
    """Every parameter dimension must be divisible by the mesh axes it is split over."""
    from jax.sharding import PartitionSpec as P

    problems = []
    for (path, p), spec in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                               jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        for dim, entry in zip(p.shape, spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            size = int(np.prod([mesh.shape[n] for n in names if n is not None]))
            if dim % size:
                problems.append(f"{jax.tree_util.keystr(path)} dim {dim} over {entry} ({size})")
    if problems:
        raise ValueError("parameters not divisible by the mesh: " + "; ".join(problems[:4])
                         + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
                         + ". Change --config.mesh.* or the model size (vocab: --config.model.vocab_multiple)")


def check_batch(batch_size: int, microbatches: int, mesh: Mesh, process_count: int) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if microbatches < 1 or batch_size % microbatches:
        raise ValueError(f"batch_size={batch_size} is not divisible by microbatches={microbatches}")
    micro = batch_size // microbatches
    if micro % shards:
        raise ValueError(f"microbatch of {micro} sequences (batch_size={batch_size} / microbatches="
                         f"{microbatches}) is not divisible by data*fsdp={shards}; change batch_size or the mesh")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")


def check_model(model_cfg, mesh: Mesh) -> None:
    t = mesh.shape["tensor"]
    if model_cfg.n_heads % t:
        raise ValueError(f"model has {model_cfg.n_heads} heads, not divisible by mesh.tensor={t}; "
                         f"choose a tensor axis size that divides the heads")
    if model_cfg.kv_heads % t:
        raise ValueError(f"model has {model_cfg.kv_heads} key/value heads, not divisible by mesh.tensor={t}; "
                         f"choose a tensor axis size that divides them (or more model.n_kv_heads)")
