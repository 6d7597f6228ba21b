"""Files that are made once (downloaded, unpacked, printed) and then read from a cache directory."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable


def cached_file(path: pathlib.Path, make: Callable[[pathlib.Path], pathlib.Path]) -> pathlib.Path:
    """``path`` if it exists; else ``make(tmp)``, which writes the file into the empty directory ``tmp`` (in
    the cache directory, removed afterwards) and returns it, renamed to ``path``: atomic, so a concurrent
    reader never sees half a file, and a failed ``make`` leaves nothing behind."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        os.replace(make(pathlib.Path(tmp)), path)
    return path
