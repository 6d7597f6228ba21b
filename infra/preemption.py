"""Preemption: SIGTERM/SIGINT ask the loop to finish the current step, write a checkpoint and exit 0; a
second signal exits at once.

In a multi-process job the signal may reach the processes at different steps (or only one of them), but
all of them must stop after the same step, or the next collective hangs. ``StopAgreement`` makes them
agree through a tiny all-reduce of the local flags that is issued every step and read one step later
(the loop already waits for the previous step's metrics, so this costs no extra synchronisation): every
process sees the same answer at the same step. Single-process runs use the local flag directly.

(JAX's own ``multihost_utils.reached_preemption_sync_point`` serves the same purpose but only hears
about SIGTERM through the coordination service's own handler, not SIGINT, and not at all without
``jax.distributed``; the all-reduce works the same everywhere.)
"""
from __future__ import annotations

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT into ``requested = True``."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = None
        self._signals = signals
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\nsecond {name}: exiting immediately without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        print(f"\n{name} received: finishing this step, saving a checkpoint, then exiting (send it again to "
              f"exit immediately)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopAgreement:
    """``agree(local_flag)`` is called once per step by every process and returns the same bool on all of
    them: whether any process's flag was set at the previous call (at this call, with one process)."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            devices = np.array(jax.devices())
            mesh = Mesh(devices, ("all",))
            self._sharding = NamedSharding(mesh, P("all"))
            self._n_local = len(jax.local_devices())
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, local: bool) -> bool:
        if not self.multi:
            return bool(local)
        flags = np.full((self._n_local,), int(local), np.int32)
        new = self._reduce(jax.make_array_from_process_local_data(self._sharding, flags))
        previous, self._pending = self._pending, new
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))
