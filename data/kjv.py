"""The King James Bible (public domain, 4.3 MB, 66 books) as a named corpus, from Debian's packages.

Debian ships the text as ``bible-kjv-text`` (a compressed data file and its concordance) and its reader, the
``bible`` program, as ``bible-kjv``. On first use both ``.deb`` files are fetched with ``apt-get download``
(nothing is installed), unpacked with ``dpkg-deb -x`` into a temporary dir, and
``bible -p <data dir> gen1:1-rev22:21`` prints the whole text at 80 columns, which is cached as ``kjv.txt``
(``data.cache``: made in a temporary dir and renamed). The printout opens every chapter with a line
``<Book> <chapter>`` followed by a blank line, and every verse with its number; a book, from its chapter 1
heading to the next book's, is one document (``books``).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess

from data.cache import cached_file

KJV = "kjv"
TEXT_FILE = "kjv.txt"
N_BOOKS = 66
_PACKAGES = ("bible-kjv-text", "bible-kjv")
_WHOLE_BIBLE = "gen1:1-rev22:21"
_COLUMNS = "80"
_CHAPTER_ONE = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]*?) 1\n", re.M)


def kjv_text(cache_dir: pathlib.Path) -> pathlib.Path:
    """Path of the cached ``kjv.txt``, printed from Debian's ``bible-kjv-text`` on first use."""
    text_path = cache_dir / TEXT_FILE

    def make(tmp: pathlib.Path) -> pathlib.Path:
        _run(["apt-get", "download", *_PACKAGES], tmp, text_path)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], tmp, text_path)
        printed = _run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), _WHOLE_BIBLE], tmp, text_path)
        if len(books(printed)) != N_BOOKS:
            raise ValueError(f"`bible {_WHOLE_BIBLE}` printed {len(books(printed))} books, not {N_BOOKS}: the "
                             f"Debian packages {', '.join(_PACKAGES)} have changed format; report it")
        (tmp / TEXT_FILE).write_text(printed, encoding="utf-8")
        return tmp / TEXT_FILE

    return cached_file(text_path, make)


def _run(cmd: list[str], cwd: pathlib.Path, text_path: pathlib.Path) -> str:
    """stdout of ``cmd``; a ValueError that names the command, its output and the fix if it fails."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "COLUMNS": _COLUMNS})
        detail = (proc.stdout[-1000:] if proc.returncode else "") + proc.stderr[-2000:]
        if proc.returncode == 0:
            return proc.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        detail = repr(e)
    raise ValueError(
        f"could not make the KJV corpus: `{' '.join(cmd)}` failed:\n{detail.strip()}\n"
        f"Fix: it needs Debian's apt-get and dpkg-deb and a package list (run `apt-get update` once); or print "
        f"the text elsewhere (apt-get download {' '.join(_PACKAGES)}, dpkg-deb -x each into a dir D, then "
        f"COLUMNS={_COLUMNS} D/usr/bin/bible -p D/usr/lib {_WHOLE_BIBLE}) and save it as {text_path}")


def books(text: str) -> list[tuple[str, str]]:
    """``(book, text)`` for each book of a ``bible`` printout, in order: the text from one chapter-1
    heading up to the next."""
    starts = list(_CHAPTER_ONE.finditer(text))
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return [(m["book"], text[m.start():end].strip("\n") + "\n") for m, end in zip(starts, ends)]
