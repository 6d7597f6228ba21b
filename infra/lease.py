"""One writer per workdir: a lease file that a run takes before it writes anything and keeps fresh.

``<workdir>/LEASE.json`` holds ``{"holder", "host", "pid", "started", "heartbeat"}`` (times in seconds since
the epoch). Taking it is atomic: the file is created with O_CREAT | O_EXCL, so of two runs that start at
once exactly one gets it; the other stops with an error naming the holder. A thread rewrites the heartbeat
every ``heartbeat_s``; the lease is stale, and is taken over with a warning, when its heartbeat is older than
``stale_after_s`` or its holder is a process of this host that no longer exists (a run killed with kill -9).
A takeover goes through a second O_EXCL file, so two runs that both find the lease stale cannot both take
it. Releasing deletes the file if this run still holds it.

This needs a file system with atomic exclusive create (local disks, NFS v3+, Lustre); object storage
(gs://) would need a conditional write on the object's generation instead.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from infra.files import write_atomic

LEASE = "LEASE.json"


class LeaseError(RuntimeError):
    """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLease:
    """Context manager: ``with WorkdirLease(workdir): ...`` holds the workdir's lease for the block."""

    def __init__(self, workdir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.path = os.path.join(workdir, LEASE)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written, or damaged: judge it by its age
            return {"holder": "?", "host": "?", "pid": -1, "heartbeat": os.path.getmtime(self.path)}

    def _stale(self, other: dict) -> str:
        """Why ``other``'s lease is stale, or "" if it is live."""
        age = time.time() - float(other.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago (stale after {self.stale_after_s:g} s)"
        if other.get("host") == self.record["host"] and not _pid_alive(int(other.get("pid", -1))):
            return f"process {other.get('pid')} no longer runs on this host"
        return ""

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        now = time.time()
        self.record.update(started=now, heartbeat=now)
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, other: dict, why: str) -> bool:
        """Replace a stale lease, guarded by an exclusive takeover file so one run does it."""
        guard = self.path + ".takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if time.time() - os.path.getmtime(guard) > self.stale_after_s:
                os.remove(guard)  # left by a run that died mid-takeover
            return False
        try:
            current = self._read()
            if current is not None and current.get("holder") == other.get("holder"):
                print(f"WARNING: taking over the lease of {self.path} from {_describe(other)}: {why}", flush=True)
                os.remove(self.path)
            return self._create()
        finally:
            os.remove(guard)

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            other = self._read()
            if other is None:
                continue
            why = self._stale(other)
            if not why:
                raise LeaseError(f"{os.path.dirname(self.path)} is in use by another run ({_describe(other)}); "
                                 f"wait for it to finish, stop it, or use another --config.workdir. If that run "
                                 f"is dead its lease goes stale {self.stale_after_s:g} s after its last heartbeat")
            if self._take_over(other, why):
                break
        else:
            raise LeaseError(f"could not take the lease {self.path}: other runs keep taking it")
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current is None or current.get("holder") != self.record["holder"]:
                print(f"WARNING: the lease {self.path} was taken by another run ({_describe(current or {})})",
                      flush=True)
                return
            self.record["heartbeat"] = time.time()
            write_atomic(self.path, json.dumps(self.record).encode())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("holder") == self.record["holder"]:
            os.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _describe(record: dict) -> str:
    started = record.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    beat = record.get("heartbeat")
    ago = f"{time.time() - float(beat):.0f} s ago" if beat else "?"
    return f"pid {record.get('pid')} on {record.get('host')}, since {since}, last heartbeat {ago}"
