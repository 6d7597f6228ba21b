"""Checkpoints of a run with orbax: the train state (params, full optimizer state, step), the data
iterator's state, the resolved config and a small ``meta`` record, saved asynchronously and atomically
(orbax writes into a temporary directory and renames it when every process has finished, so a crash
mid-save never leaves a directory that looks like a finished checkpoint).

A checkpoint ``<dir>/<step>/`` holds four items:

- ``state``  the ``TrainState`` (orbax PyTree item: OCDBT + zarr, every process writes its shards);
- ``data``   grain's iterator state per process (``process_<i>-of-<n>.json``);
- ``config`` the resolved run config (JSON);
- ``meta``   ``{"leaves": {path: "float32[64,256]"}, "fingerprint": {path: hex}, ...}``: the tree the
  state had, and a checksum of every leaf's bytes.

Restoring always goes into abstract targets carrying the *current* mesh's shardings, so a run saved on
one mesh (or process count) resumes on another. Before reading any array, the saved leaves are compared
with the current abstract state; a difference (another model or optimizer) raises ``CheckpointError``
listing the mismatched leaves. After reading, the restored state's fingerprint is recomputed and compared
with the saved one: orbax/tensorstore reads some corrupted chunks (bytes overwritten in place, a bit
flip) without any error, so this is the only way to notice them. A checkpoint that fails to read or to
verify is skipped with a warning naming it, and the previous one is tried. Nothing is deleted: skipped
checkpoints are renamed to ``<step>.unusable-<time>`` and unfinished saves (orbax's
``<step>.orbax-checkpoint-tmp*`` directories, left by a crash mid-save) to ``<step>.unfinished-<time>``,
so that the resumed run can write those steps again.

The fingerprint of a leaf is two sums over its elements' bit patterns ``u_i`` (as uint32), modulo 2^32:
``sum_i u_i`` and ``sum_i u_i * (2 i + 1)`` with ``i`` the row-major index. Integer sums are exact in any
order, so the value does not depend on the mesh, the sharding or the number of processes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from infra.cli import explain
from infra.files import epath, is_uri, join, move_tree, read_text, resolve

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint exists but this run must not use it (other model/optimizer, other data order), or none
    of the existing checkpoints can be read."""


class CheckpointSaveError(CheckpointError):
    """An asynchronous save failed (a full disk, a storage error): the run stops, its last complete
    checkpoint is where a rerun resumes."""


def warn(msg: str) -> None:
    """A warning the user must see (printed once, by process 0)."""
    if jax.process_index() == 0:
        print(f"WARNING: {msg}", flush=True)


# ----------------------------------------------------------------------------------------- tree records

def leaf_paths(tree) -> list[str]:
    """'params/blocks/0/attn/qkv_kernel'-style paths (orbax names the arrays the same way with dots)."""
    return [jax.tree_util.keystr(kp, simple=True, separator="/") for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def describe(tree) -> dict[str, str]:
    """{path: 'float32[64,256]'} of a tree of arrays or ShapeDtypeStructs."""
    return {p: f"{jnp.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"
            for p, x in zip(leaf_paths(tree), jax.tree.leaves(tree))}


def mismatches(saved: dict[str, str], current: dict[str, str], limit: int = 12) -> list[str]:
    """Human-readable differences between two ``describe`` records (empty if they agree)."""
    out = [f"{p}: checkpoint {saved[p]}, this run {current[p]}" for p in saved if p in current
           and saved[p] != current[p]]
    out += [f"{p}: only in the checkpoint ({saved[p]})" for p in saved if p not in current]
    out += [f"{p}: only in this run ({current[p]})" for p in current if p not in saved]
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _is_empty(x) -> bool:
    return x is not None and math.prod(x.shape) == 0


def _drop_empty(tree):
    """Zero-size leaves (some optimizers keep placeholders) become None: orbax cannot save them."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _fill_empty(restored, abstract):
    """Put the zero-size leaves of ``abstract`` back into a tree restored from ``_drop_empty``."""
    return jax.tree.map(lambda a, r: jnp.zeros(a.shape, a.dtype, device=a.sharding) if _is_empty(a) else r,
                        abstract, restored)


def _bits_u32(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
    if x.dtype != unsigned:
        x = jax.lax.bitcast_convert_type(x, unsigned)
    return x.astype(jnp.uint32)


def _leaf_sums(x):
    u = _bits_u32(x)
    index = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(out_sharding):
    # one jitted function per output sharding: compiled once per tree structure, shapes and shardings
    return jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]), out_shardings=out_sharding)


def fingerprint(tree) -> dict[str, str]:
    """{path: 16 hex digits}: a mesh-independent checksum of every leaf (see module docstring)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return {}
    sharding = getattr(leaves[0], "sharding", None)
    out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
    sums = np.asarray(_fingerprint_fn(out)(leaves).addressable_data(0))
    return {p: f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(leaf_paths(tree), sums)}


def read_meta(step_dir: str) -> dict:
    """The ``meta`` item of a checkpoint step directory."""
    return json.loads(read_text(join(step_dir, "meta", "metadata")))


def verify(tree, meta: dict) -> None:
    """Raise ``IOError`` if a leaf of ``tree`` does not match the fingerprint saved in ``meta`` (its paths
    are those of the saved state, e.g. ``{"params": params}`` for the parameters alone)."""
    bad = [p for p, h in fingerprint(tree).items() if meta["fingerprint"].get(p) != h]
    if bad:
        raise IOError(f"the restored contents of {len(bad)} array(s) do not match the checksum saved with "
                      f"the checkpoint (corrupted files?): {', '.join(bad[:4])}" + (" ..." if len(bad) > 4 else ""))


def _reason(error: BaseException, limit: int = 300) -> str:
    """The root cause of a (possibly chained) exception in one short line: orbax wraps tensorstore's
    precise message ("Error reading ... byte range ... is not valid") in a long generic one."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every process (so all of them take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ the manager

# Orbax's replica-parallel saving splits a replicated array across its replicas so that they write in
# parallel, at the cost of one compiled slice per array on the first save (about 130 compilations, 20 s
# on a loaded 2-core CPU for the Celo2 state of a 2-layer model). Only worth it for large arrays.
REPLICA_PARALLEL_MIN_BYTES = 16 * 2**20


@functools.lru_cache(maxsize=None)
def _type_handlers():
    """orbax's default type handlers, with replica-parallel saving only for large arrays."""
    def handler(ty):
        if ty is jax.Array:
            return ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
        return ocp.type_handlers.get_type_handler(ty)

    return ocp.type_handlers.create_type_handler_registry(
        *[(ty, handler(ty)) for ty in ocp.type_handlers.supported_types()])


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    return ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())


def _save_args(state):
    return ocp.args.PyTreeSave(_drop_empty(state))


def _restore_args(abstract, partial: bool = False):
    item = _drop_empty(abstract)
    return ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=partial)


class Checkpointer:
    """Saves and restores a run's checkpoints in ``directory`` (see the module docstring).

    Retention: the newest ``keep`` checkpoints, plus every checkpoint whose step is a multiple of
    ``keep_every`` (0: none).
    """

    def __init__(self, directory: str, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_retries: int = 2, retry_wait_s: float = 1.0, keep_set_aside: int = 2):
        self.directory = resolve(directory)
        self.read_retries, self.retry_wait_s, self.keep_set_aside = read_retries, retry_wait_s, keep_set_aside
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} must be >= 1")
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=False,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        handlers = {"state": _state_handler(), "data": grain.checkpoint.CheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.last_save_blocking_s = 0.0
        self._saving = None  # the step of the latest save started
        self._checked = None  # the step of the latest save seen complete
        self._failed = False  # a failed save was reported: closing does not report it again

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return join(self.directory, str(step))

    def incomplete(self) -> list[str]:
        """Directories of saves that never finished (a crash or kill mid-save); orbax ignores them.

        On object storage orbax writes a save into its final ``<step>/`` and marks it finished with a
        ``commit_success.txt`` object, instead of renaming a temporary directory."""
        if is_uri(self.directory):
            found = epath(self.directory).iterdir() if epath(self.directory).is_dir() else []
            return sorted(str(p) for p in found if p.name.isdigit() and not (p / "commit_success.txt").exists())
        if not os.path.isdir(self.directory):
            return []
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory)
                      if ".orbax-checkpoint-tmp" in n)

    def save(self, step: int, state, data_iterator=None, config: dict | None = None,
             extra_meta: dict | None = None) -> None:
        """Start an asynchronous save of ``step`` (returns once the arrays are copied off the devices)."""
        t0 = time.perf_counter()
        meta = {"format": FORMAT, "step": int(step), "process_count": jax.process_count(),
                "leaves": describe(state), "fingerprint": fingerprint(state), **(extra_meta or {})}
        items = {"state": _save_args(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        try:  # orbax waits for the previous save before it starts one: a failure there is the previous save's
            self.manager.wait_until_finished()
            self._saving = int(step)
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - reported as one error naming the failed step
            raise self._save_error(e) from e
        self.last_save_blocking_s = time.perf_counter() - t0

    def check(self) -> None:
        """Raise ``CheckpointSaveError`` if the latest asynchronous save has ended in failure. Cheap while it is
        in progress (a flag orbax sets on every process at once); once it has ended, waiting for it returns at
        once and raises its error."""
        if self._saving is None or self._checked == self._saving or self.manager.is_saving_in_progress():
            return
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - whatever orbax's save thread raised, reported as one error
            raise self._save_error(e) from e
        self._checked = self._saving

    def _save_error(self, error: BaseException) -> CheckpointSaveError:
        """The error of a failed save: the step, why, and the last complete checkpoint. What the save wrote
        is deleted (by process 0): a failed save leaves no partial checkpoint (on a full disk, no stranded
        bytes either)."""
        self._failed = True
        if jax.process_index() == 0:
            for partial in self.incomplete():
                if os.path.basename(partial.rstrip("/")).split(".")[0] == str(self._saving):
                    epath(partial).rmtree()
        # from the directory itself: orbax's own list has the failed step, and no longer the one before it
        self.manager.reload()
        done = [s for s in self.steps() if s != self._saving]
        last = (f"the last complete checkpoint is {self.step_dir(done[-1])}, where a rerun resumes" if done else
                "no checkpoint was completed before it, so a rerun starts from step 0")
        return CheckpointSaveError(f"saving the checkpoint of step {self._saving} in {self.directory} failed "
                                   f"({explain(error) or _reason(error)}); {last}")

    def meta(self, step: int) -> dict:
        return read_meta(self.step_dir(step))

    def config(self, step: int) -> dict:
        return json.loads(read_text(join(self.step_dir(step), "config", "metadata")))

    def restore(self, step: int, abstract_state, validate: Callable[[int, dict, dict], None] | None = None):
        """Train state of ``step``, read into ``abstract_state``'s shardings and verified.

        Raises ``CheckpointError`` if the checkpoint does not fit this run (``validate(step, meta, config)``
        may raise it too, e.g. for another data order), or another exception if it cannot be read or its
        contents do not match the saved fingerprint.

        The data iterator's saved state is not read back: the pipeline's position is a pure function of
        the step (``data.train_iterator(..., start_step=step)``), which also holds when the number of
        processes changed, whereas grain's saved state is per process.
        """
        state, meta = self._read(step, abstract_state, validate)
        verify(state, meta)
        return state

    def _read(self, step, abstract_state, validate):
        meta = self.meta(step)
        current = describe(abstract_state)
        problems = mismatches(meta["leaves"], current)
        if problems:
            params_fit = not mismatches(*({p: d for p, d in leaves.items() if p.startswith("params/")}
                                          for leaves in (meta["leaves"], current)))
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} holds a different train state than this run builds (another "
                f"model or optimizer config?). Mismatched leaves:\n  " + "\n  ".join(problems)
                + "\nResume with the config it was written with (its config.json) or use another workdir"
                + (f"; to keep its parameters with a new optimizer, start a new workdir with "
                   f"--config.init_from={self.step_dir(step)}" if params_fit else ""))
        if validate is not None:
            validate(step, meta, self.config(step))
        args = ocp.args.Composite(state=_restore_args(abstract_state))
        return _fill_empty(self.manager.restore(step, args=args).state, abstract_state), meta

    def _read_retrying(self, step, abstract_state, validate):
        """``_read``, retried ``read_retries`` times (waits of retry_wait_s, 2 retry_wait_s, ...) on a read
        error, which may be transient (storage, network); ``CheckpointError`` is final."""
        for attempt in range(self.read_retries + 1):
            try:
                return self._read(step, abstract_state, validate)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - retried, then reported by the caller
                if attempt == self.read_retries:
                    raise
                wait = self.retry_wait_s * 2**attempt
                warn(f"reading checkpoint {self.step_dir(step)} failed ({_reason(e)}); retrying in {wait:g} s")
                time.sleep(wait)

    def restore_latest(self, abstract_state, validate=None, start_over: bool = False):
        """(step, state) of the newest checkpoint that restores and verifies, or (None, None) if there is none.

        A read error is retried (``read_retries``) before the checkpoint counts as unusable. Unusable
        checkpoints newer than the one restored are renamed with a warning. If checkpoints exist but none is
        usable, ``CheckpointError`` names each one and why, and nothing is renamed (under a requeueing
        scheduler a storage outage must not discard the run); with ``start_over`` they are set aside and
        (None, None) is returned. ``CheckpointError`` (incompatible state or data order) is raised, not
        skipped: an older checkpoint of the same run would be just as incompatible.

        Multi-process: every process reads its shards; they agree on success before the (collective)
        verification and again after it, so all of them pick the same step.
        """
        unfinished = self.incomplete()
        for path in unfinished:
            warn(f"ignoring {path}: an unfinished checkpoint save (the run was killed while writing it)")
        self._move_aside(unfinished, "unfinished")  # else orbax deletes it when it saves that step again
        skipped = []
        for step in reversed(self.steps()):
            state, error = None, None
            try:
                state, meta = self._read_retrying(step, abstract_state, validate)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                error = e
            if _all_processes_agree(error is None):
                try:
                    verify(state, meta)
                except IOError as e:
                    error = e
                if error is None:
                    self._move_aside([self.step_dir(s) for s, _ in skipped], "unusable")
                    return step, state
            reason = _reason(error) if error else "failed on another process"
            warn(f"checkpoint {self.step_dir(step)} could not be restored ({reason}); trying the previous one")
            skipped.append((step, reason))
            del state
        if skipped and not start_over:
            raise CheckpointError(
                f"none of the {len(skipped)} checkpoint(s) in {self.directory} could be restored:\n  "
                + "\n  ".join(f"step {s}: {r}" for s, r in skipped) + "\nNothing was renamed or deleted. If "
                "the storage was unavailable, rerun once it is back; to set them aside and train from step 0, "
                "rerun with --config.start_over=True")
        if skipped:
            warn(f"no usable checkpoint in {self.directory}; start_over: setting them aside, starting from step 0")
            self._move_aside([self.step_dir(s) for s, _ in skipped], "unusable")
        return None, None

    def set_aside(self, label: str) -> list[str]:
        """The set-aside checkpoint directories of a kind (``<step>.<label>-<time>``), oldest first."""
        if is_uri(self.directory):  # no directory times on object storage: the name's time stamp orders them
            found = epath(self.directory).iterdir() if epath(self.directory).is_dir() else []
            return sorted((str(p) for p in found if f".{label}-" in p.name), key=lambda p: p.rsplit(f".{label}-")[1])
        if not os.path.isdir(self.directory):
            return []
        found = [os.path.join(self.directory, n) for n in os.listdir(self.directory) if f".{label}-" in n]
        return sorted(found, key=os.path.getmtime)

    def _move_aside(self, paths: list[str], label: str) -> None:
        """Rename checkpoint dirs out of orbax's sight (it would delete or overwrite them), keeping the newest
        ``keep_set_aside`` of this kind for inspection (older ones are deleted, with a warning naming them:
        at GPT-3 XL scale each is ~16 GB).

        Called by every process with the same ``label`` (it ends in a barrier); process 0 renames."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for path in paths:
                dst = base = f"{path.split('.orbax-checkpoint-tmp')[0]}.{label}-{stamp}"
                n = 1
                while epath(dst).exists():
                    dst, n = f"{base}-{n}", n + 1
                move_tree(path, dst)
                warn(f"moved {path} to {dst} (kept for inspection, up to {self.keep_set_aside} of its kind)")
            old = self.set_aside(label)[:-self.keep_set_aside or None] if paths else []
            for path in old:
                epath(path).rmtree()
                warn(f"deleted {path}: more than keep_set_aside={self.keep_set_aside} {label} checkpoints")
        _barrier(f"checkpoint_move_aside_{label}")
        if paths:
            self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait until the last save is complete (``CheckpointSaveError`` if it failed and was not reported yet),
        then close."""
        try:
            self.manager.wait_until_finished()  # raises a failed save's error
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - reported once, as one error
            if not self._failed:
                raise self._save_error(e) from e
        finally:
            with contextlib.suppress(Exception):  # a manager whose save failed may fail to close too
                self.manager.close()


# ------------------------------------------------------------------------- params only (init_from, sample)

def candidates(path: str) -> list[str]:
    """Step directories meant by ``path``, newest first: a step dir itself, or the steps of a checkpoints
    dir or of a workdir (its ``checkpoints/``)."""
    p = epath(resolve(path))
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    path = str(p)
    if (p / "state").is_dir():
        return [path]
    steps = sorted((int(c.name) for c in (p.iterdir() if p.is_dir() else []) if c.name.isdigit()
                    and (c / "state").is_dir()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path} (expected a workdir, its checkpoints/ dir or a "
                                f"checkpoint step dir)")
    return [join(path, str(s)) for s in steps]


def _restore_params_from(step_dir: str, abstract_params):
    meta = read_meta(step_dir)
    saved = {p[len("params/"):]: d for p, d in meta["leaves"].items() if p.startswith("params/")}
    problems = mismatches(saved, describe(abstract_params))
    if problems:
        raise CheckpointError(f"the parameters in {step_dir} do not fit this model:\n  " + "\n  ".join(problems))
    with ocp.Checkpointer(_state_handler()) as checkpointer:
        restored = checkpointer.restore(join(step_dir, "state"),
                                        args=_restore_args({"params": abstract_params}, partial=True))
    params = _fill_empty(restored["params"], abstract_params)
    verify({"params": params}, meta)
    return meta["step"], params


def restore_params(path: str, abstract_params):
    """(step, params) of the newest usable checkpoint at ``path`` (see ``candidates``), without its
    optimizer state; ``abstract_params`` carries the target shardings.

    Raises ``CheckpointError`` if the parameter shapes differ, or when no checkpoint restores (each named with
    its reason); an unreadable or corrupted checkpoint is skipped with a warning while an older one is left.
    """
    dirs, reasons = candidates(path), []
    for step_dir in dirs:
        try:
            return _restore_params_from(step_dir, abstract_params)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint, reported with the others below
            reasons.append(f"{step_dir}: {_reason(e)}")
            if step_dir != dirs[-1]:
                warn(f"parameters of {step_dir} could not be restored ({_reason(e)}); trying the previous checkpoint")
    raise CheckpointError(f"no checkpoint at {path} can be restored ({'; '.join(reasons)}); it is damaged: "
                          f"restore it from a copy, or name a checkpoint step dir that is intact")
