"""Command-line entry points end bad input with one line on stderr and exit code 2; ``TRAIN_DEBUG=1`` shows
the traceback instead.

``user_errors()`` wraps a command's work; ``parse_flags_or_exit`` is an absl ``flags_parser`` that does the
same for flag parsing (a misspelled config field, a missing config file), which absl would otherwise report
as a long traceback before the program's own code runs.

While a command fails, libraries report the errors they swallow at length (orbax and tensorstore leave
coroutines whose "Exception ignored in ..." reports run to thousands of lines after one bad checkpoint).
``user_errors`` writes those reports, and the asyncio, absl and orbax log records of warnings and errors, to
a log file (``library_log``: the run's workdir once it is known, else a file in the temp dir) instead of the
terminal; the error line names that file when anything was written to it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import tempfile
import threading
import traceback

# Errors that mean "the input is wrong" (the caller's to fix), not a bug: ValueError covers config and
# checkpoint errors (CheckpointError), OSError missing or unreadable files; RuntimeError subclasses the
# commands name (a NaN loss, a held workdir) are added by the caller. KeyError and AttributeError only count
# while flags are parsed (a misspelled config field); later they are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError)


def _one_line(error: BaseException) -> str:
    """The message on one line; a KeyError's (ml_collections' "did you mean") without its quoting."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split())


def explain(error: BaseException) -> str | None:
    """The cause and the fix of an error that libraries raise for a problem of the machine or the setup rather
    than of the program (a full disk, missing cloud credentials or libraries), or None."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        return (f"no space left on the device ({_one_line(error)}); free space (or choose another directory) and "
                "rerun the same command: it resumes where it stopped")
    if type(error).__name__ == "DefaultCredentialsError":
        return ("gs:// needs Google Cloud credentials, and none were found: run `gcloud auth application-default "
                "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file")
    if isinstance(error, ImportError) and any(m in text for m in ("google.cloud", "gcsfs", "google-cloud")):
        return f'gs:// paths need the gcs extra ({_one_line(error)}): pip install -e ".[gcs]"'
    return None


_LIBRARY_LOGGERS = ("asyncio", "absl", "orbax", "jax._src.distributed")


class _LibraryLog:
    """The file that library noise goes to, created (with its directory) only when something is written."""

    def __init__(self):
        self.path, self._file = None, None

    def write(self, text: str) -> None:
        """Best effort: text that cannot be written (the log's disk is full, as in the failures it records) is
        dropped, never reported on the terminal it keeps clear."""
        try:
            if self._file is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._file = open(self.path, "a", buffering=1)
            self._file.write(text)
        except OSError:
            pass

    def flush(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()

    def move(self, path: str) -> None:
        if self._file is not None:
            self._file.close()
        self.path, self._file = path, None

    def written(self) -> bool:
        return self.path is not None and os.path.exists(self.path) and os.path.getsize(self.path) > 0


_LOG = _LibraryLog()


def library_log(path: str | None = None) -> str:
    """Divert library noise (module docstring) to the file ``path`` (default, unless a path was given before:
    ``<temp dir>/<command>-<pid>.log``); returns its path. The file exists only once something is written."""
    if path is None and _LOG.path is not None:
        return _LOG.path
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m <module>: the module's name
    command = spec.name.removesuffix(".__main__") if spec else os.path.basename(sys.argv[0]) or "python"
    _LOG.move(os.path.abspath(path) if path else os.path.join(tempfile.gettempdir(), f"{command}-{os.getpid()}.log"))
    handler = logging.StreamHandler(_LOG)
    handler.setLevel(logging.WARNING)
    handler.library_log = True
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers = [h for h in lib.handlers if not getattr(h, "library_log", False)] + [handler]
        lib.propagate = False
    sys.unraisablehook = _write_unraisable
    threading.excepthook = _write_thread_exception
    return _LOG.path


def _write_thread_exception(args) -> None:
    """``threading.excepthook``: a library's background thread that died (an asynchronous save's) is reported
    to its caller by the library; its traceback goes to the library log."""
    lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
    _LOG.write(f"Exception in thread {getattr(args.thread, 'name', '?')}:\n{''.join(lines)}")


def _write_unraisable(report) -> None:
    """``sys.unraisablehook``: an exception that nothing could raise (a coroutine's, at garbage collection) goes
    to the library log."""
    lines = traceback.format_exception(report.exc_type, report.exc_value, report.exc_traceback)
    _LOG.write(f"{report.err_msg or 'Exception ignored in'}: {report.object!r}\n{''.join(lines)}")


def exit_with(error: BaseException) -> None:
    # the project's own errors (ValueErrors) say cause and fix already, even when they quote a library's words
    message = (None if isinstance(error, ValueError) else explain(error)) or _one_line(error)
    if _LOG.written():
        message += f" (library messages: {_LOG.path})"
    print(f"error: {message}\n(set TRAIN_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def user_errors(*more: type[BaseException]):
    """Turn ``USER_ERRORS`` (and ``more``) raised in the block, and the library errors that ``explain``
    recognises, into one line and exit code 2; library noise goes to ``library_log`` meanwhile and after."""
    if not os.environ.get("TRAIN_DEBUG"):
        library_log()
    try:
        yield
    except Exception as e:
        if os.environ.get("TRAIN_DEBUG") or not (isinstance(e, USER_ERRORS + more) or explain(e)):
            raise
        exit_with(e)


def parse_flags_or_exit(argv):
    """absl ``flags_parser``: parse ``argv`` into absl's FLAGS, a bad flag or config ending in one line."""
    from absl import flags

    with user_errors(flags.Error, KeyError, AttributeError):  # a misspelled (nested) config field
        return flags.FLAGS(argv)
