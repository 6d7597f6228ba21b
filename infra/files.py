"""Files of a run, on a local disk or on object storage (``gs://bucket/...`` and the other URIs that
``etils.epath`` and orbax/tensorstore support).

A path with a URI scheme (``scheme://...``) stays a URI and goes through ``etils.epath``; any other path is a
local path, resolved against the current directory (``resolve``) and handled with ``os`` as before.

Writes are atomic either way: locally through a temporary file and ``os.replace``; on object storage an
object is replaced as a whole by one upload (readers see the old object or the new one, never a part).

Listings of object storage (``list_objects``, and ``move_tree`` through it) are fresh requests: the file
system object that etils.epath uses caches the listings it made (``epath.Path.iterdir`` and ``walk`` answer
from that cache), which miss what other processes wrote since.
"""
from __future__ import annotations

import glob
import os
import tempfile


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``gs://bucket/x`` and other ``scheme://`` paths (object storage), False for local paths."""
    head, sep, _ = str(path).partition("://")
    return bool(sep) and head.isidentifier()


def check_storage(path: str | os.PathLike) -> None:
    """ValueError naming the extra to install when ``path`` is on Google Cloud Storage and the libraries that
    read and write it there (the ``gcs`` extra) are missing: said before any work, not at the first write."""
    if not str(path).startswith("gs://"):
        return
    try:
        import gcsfs  # noqa: F401
        import google.cloud.storage  # noqa: F401
    except ImportError as e:
        raise ValueError(f'{path}: gs:// paths need the gcs extra ({e}): pip install -e ".[gcs]"') from None


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


def _fsspec(uri: str):
    """The fsspec file system of ``uri``: the very object that etils.epath uses for it (so that the listings it
    caches see what is written here), unless TensorFlow is installed (epath then uses tf.io.gfile, which caches
    no listings)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(uri)


def exists(path: str | os.PathLike) -> bool:
    return epath(path).exists() if is_uri(path) else os.path.exists(path)


def read_text(path: str | os.PathLike) -> str:
    """The text of a file or object; ``FileNotFoundError`` if there is none."""
    if is_uri(path):
        return epath(path).read_text()
    with open(path) as f:
        return f.read()


def open_binary(path: str | os.PathLike):
    """A file or object opened for reading bytes (a local file with ``open``)."""
    return epath(path).open("rb") if is_uri(path) else open(path, "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file or object; ``FileNotFoundError`` if there is none."""
    with open_binary(path) as f:
        return f.read()


def list_objects(uri: str) -> dict[str, int]:
    """The objects under the object-storage directory ``uri``, or those that match it when it is a glob (``*``,
    ``?``, ``[...]``; ``**`` for any depth): {URI: size in bytes}, from a fresh listing (empty if none)."""
    fs, scheme = _fsspec(uri), str(uri).split("://", 1)[0]
    found = fs.glob(uri, detail=True) if glob.has_magic(uri) else fs.find(str(uri).rstrip("/"), detail=True)
    return {f"{scheme}://{name}": info["size"] for name, info in sorted(found.items()) if info["type"] == "file"}


def makedirs(path: str | os.PathLike) -> None:
    """``os.makedirs(exist_ok=True)``; nothing to do on object storage (no directories there)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def move_tree(src: str, dst: str) -> None:
    """Rename a directory. On object storage (no directories, no rename): a server-side copy of every object
    under ``src`` to ``dst`` (found by a fresh listing: other processes may have written there), then their
    deletion."""
    if not is_uri(src):
        os.rename(src, dst)
        return
    src, dst = str(src).rstrip("/"), str(dst).rstrip("/")
    fs = _fsspec(src)  # epath's own file system object, so that the listings it caches (orbax's too) see the move
    for name in list_objects(src):
        fs.cp_file(name, dst + name[len(src):])
    epath(src).rmtree()


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copies the complete local file ``local`` to the object ``uri``, which appears whole or not at all: one
    request, or a resumable upload that only its last request completes (one interrupted leaves no object)."""
    _fsspec(uri).put_file(os.fspath(local), uri)


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename: the mode open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would
    race with other threads creating files), where Linux shows it; else by setting it back at once."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """``write_atomic`` of a text (UTF-8)."""
    write_atomic(path, text.encode())


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at ``path`` (local or URI), written atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
