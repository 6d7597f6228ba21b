"""Atomic file writes: a reader never sees a half-written file, whatever happens to the writer."""
from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, buf: bytes) -> None:
    """Write ``buf`` to ``path`` through a temporary file (fsynced) and ``os.replace``: never a half-written
    file, and concurrent writers never share a temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
