"""One writer per workdir: a lease file that a run takes before it writes anything and keeps fresh.

``<workdir>/LEASE.json`` holds ``{"holder", "host", "pid", "started", "heartbeat"}`` (times in seconds since
the epoch). Taking it is atomic: the file is created with O_CREAT | O_EXCL, so of two runs that start at
once exactly one gets it; the other stops with an error naming the holder. A thread rewrites the heartbeat
every ``heartbeat_s``; the lease is stale, and is taken over with a warning, when its heartbeat is older than
``stale_after_s`` or its holder is a process of this host that no longer exists (a run killed with kill -9).
A takeover goes through a second O_EXCL file, so two runs that both find the lease stale cannot both take
it. Releasing deletes the file if this run still holds it.

This needs a file system with atomic exclusive create (local disks, NFS v3+, Lustre). On Google Cloud
Storage (a ``gs://`` workdir) the same protocol runs on the object's generation instead
(``GcsWorkdirLease``, chosen by ``WorkdirLease(workdir)`` itself): the lease is created with the precondition
``ifGenerationMatch=0`` (only if no object exists), every heartbeat and a stale takeover replace it with
``ifGenerationMatch=<the generation read>`` (so of two runs that both find it stale one wins, and a holder
that lost its lease notices), and releasing deletes it only at the generation this run wrote. It needs the
``google-cloud-storage`` client (``pip install -e ".[gcs]"``), which honours ``STORAGE_EMULATOR_HOST``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from infra.files import is_uri, join, write_atomic

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

    def __new__(cls, workdir: str, *args, **kwargs):
        if cls is WorkdirLease and is_uri(workdir):
            if not str(workdir).startswith("gs://"):
                raise LeaseError(f"{workdir}: a workdir lease on object storage is implemented for gs:// only")
            cls = GcsWorkdirLease
        return super().__new__(cls)

    def __init__(self, workdir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.path = join(workdir, LEASE)
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

    def _heartbeat(self) -> bool:
        """Write a fresh heartbeat if this run still holds the lease; False if another run took it."""
        current = self._read()
        if current is None or current.get("holder") != self.record["holder"]:
            print(f"WARNING: the lease {self.path} was taken by another run ({_describe(current or {})})",
                  flush=True)
            return False
        self.record["heartbeat"] = time.time()
        write_atomic(self.path, json.dumps(self.record).encode())
        return True

    def _delete(self) -> None:
        current = self._read()
        if current is not None and current.get("holder") == self.record["holder"]:
            os.remove(self.path)

    def _prepare(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def acquire(self) -> None:
        self._prepare()
        for _ in range(3):
            if self._create():
                break
            other = self._read()
            if other is None:
                continue
            why = self._stale(other)
            if not why:
                raise LeaseError(f"{self.path.rpartition('/')[0]} is in use by another run ({_describe(other)}); "
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
            try:
                if not self._heartbeat():
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                print(f"WARNING: could not renew the lease {self.path}: {type(e).__name__}: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._delete()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class GcsWorkdirLease(WorkdirLease):
    """The lease of a ``gs://`` workdir: the same record and rules, made atomic by GCS generation
    preconditions instead of O_EXCL files (see the module docstring)."""

    def _prepare(self) -> None:
        from google.cloud import storage

        bucket, _, name = self.path[len("gs://"):].partition("/")
        self._blob = storage.Client().bucket(bucket).blob(name)
        self.generation = None  # of the object this run wrote last

    def _upload(self, generation: int) -> bool:
        """Write the record if the object's generation is ``generation`` (0: if there is no object)."""
        from google.api_core.exceptions import PreconditionFailed

        if generation is None:  # would make the write unconditional
            raise ValueError("a lease write needs the generation it replaces")
        try:
            self._blob.upload_from_string(json.dumps(self.record), content_type="application/json",
                                          if_generation_match=generation)
        except PreconditionFailed:
            current, generation = self._read_generation()
            if current != self.record:
                return False
            # our own write: the client retried it after a lost response, and the retry was refused
        else:
            generation = self._blob.generation
        self.generation = generation
        return True

    def _read_generation(self) -> tuple[dict | None, int]:
        """(record, its generation), or (None, 0) if there is no lease object."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(5):  # the object can change between reading its generation and its contents
            blob = self._blob.bucket.get_blob(self._blob.name)
            if blob is None:
                return None, 0
            generation, updated = int(blob.generation), blob.updated  # (a download may reset them)
            try:
                data = blob.download_as_bytes(if_generation_match=generation)
                break
            except NotFound:
                return None, 0
            except PreconditionFailed:
                continue
        else:
            raise LeaseError(f"could not read the lease {self.path}: other runs keep replacing it")
        try:
            return json.loads(data), generation
        except ValueError:  # not ours, or damaged: judge it by its age
            return {"holder": "?", "host": "?", "pid": -1, "heartbeat": updated.timestamp()}, generation

    def _read(self) -> dict | None:
        record, self._seen = self._read_generation()
        return record

    def _create(self) -> bool:
        now = time.time()
        self.record.update(started=now, heartbeat=now)
        return self._upload(0)

    def _take_over(self, other: dict, why: str) -> bool:
        """Replace the stale lease only if it is still the generation that was judged stale."""
        print(f"WARNING: taking over the lease of {self.path} from {_describe(other)}: {why}", flush=True)
        now = time.time()
        self.record.update(started=now, heartbeat=now)
        return self._upload(self._seen)

    def _heartbeat(self) -> bool:
        self.record["heartbeat"] = time.time()
        if self._upload(self.generation):
            return True
        print(f"WARNING: the lease {self.path} was taken by another run ({_describe(self._read() or {})})",
              flush=True)
        return False

    def _delete(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if self.generation is not None:
            try:
                self._blob.delete(if_generation_match=self.generation)
            except (NotFound, PreconditionFailed):
                pass  # taken over by another run meanwhile: it is that run's now


def _describe(record: dict) -> str:
    started = record.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    beat = record.get("heartbeat")
    ago = f"{time.time() - float(beat):.0f} s ago" if beat else "?"
    return f"pid {record.get('pid')} on {record.get('host')}, since {since}, last heartbeat {ago}"
