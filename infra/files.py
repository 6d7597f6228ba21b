"""Files of a run, on a local disk or on object storage (``gs://bucket/...`` and the other URIs that
``etils.epath`` and orbax/tensorstore support).

A path with a URI scheme (``scheme://...``) stays a URI and goes through ``etils.epath``; any other path is a
local path, resolved against the current directory (``resolve``) and handled with ``os`` as before.

Writes are atomic either way: locally through a temporary file and ``os.replace``; on object storage an
object is replaced as a whole by one upload (readers see the old object or the new one, never a part).
"""
from __future__ import annotations

import os
import tempfile


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``gs://bucket/x`` and other ``scheme://`` paths (object storage), False for local paths."""
    head, sep, _ = str(path).partition("://")
    return bool(sep) and head.isidentifier()


def resolve(path: str | os.PathLike) -> str:
    """A URI unchanged (``os.path.abspath`` would turn ``gs://b/x`` into ``<cwd>/gs:/b/x``); a local path
    made absolute (relative to the current directory)."""
    return str(path).rstrip("/") if is_uri(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URIs."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
    return os.path.join(base, *parts)


def epath(path: str | os.PathLike):
    """``etils.epath.Path`` of ``path`` (local or URI)."""
    from etils import epath as _epath

    return _epath.Path(path)


def exists(path: str | os.PathLike) -> bool:
    return epath(path).exists() if is_uri(path) else os.path.exists(path)


def read_text(path: str | os.PathLike) -> str:
    """The text of a file or object; ``FileNotFoundError`` if there is none."""
    if is_uri(path):
        return epath(path).read_text()
    with open(path) as f:
        return f.read()


def makedirs(path: str | os.PathLike) -> None:
    """``os.makedirs(exist_ok=True)``; nothing to do on object storage (no directories there)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def move_tree(src: str, dst: str) -> None:
    """Rename a directory. On object storage (no directories, no rename): a server-side copy of every object
    under ``src`` to ``dst``, then their deletion."""
    if not is_uri(src):
        os.rename(src, dst)
        return
    # through epath's own file system objects, so that the listings they cache (orbax's too) see the move
    scheme, bare = str(src).rstrip("/").split("://", 1)
    for directory, _, names in epath(src).walk():  # (walk gives the directories without the scheme)
        sub = str(directory).removeprefix(f"{scheme}://").removeprefix(bare).strip("/")
        for name in names:
            epath(join(src, sub, name)).copy(join(dst, sub, name))
    epath(src).rmtree()


def write_atomic(path: str | os.PathLike, buf: bytes) -> None:
    """Write ``buf`` to ``path`` through a temporary file (fsynced) and ``os.replace``: never a half-written
    file, and concurrent writers never share a temporary file. On object storage: one upload of the whole
    object, which is atomic there."""
    if is_uri(path):
        epath(path).write_bytes(buf)
        return
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """``write_atomic`` of a text (UTF-8)."""
    write_atomic(path, text.encode())


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at ``path`` (local or URI), written atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
