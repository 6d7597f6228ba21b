"""Command-line entry points end bad input with one line on stderr and exit code 2; ``TRAIN_DEBUG=1`` shows
the traceback instead.

``user_errors()`` wraps a command's work; ``parse_flags_or_exit`` is an absl ``flags_parser`` that does the
same for flag parsing (a misspelled config field, a missing config file), which absl would otherwise report
as a long traceback before the program's own code runs.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys

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


def exit_with(error: BaseException) -> None:
    message = explain(error) or _one_line(error)
    print(f"error: {message}\n(set TRAIN_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def user_errors(*more: type[BaseException]):
    """Turn ``USER_ERRORS`` (and ``more``) raised in the block, and the library errors that ``explain``
    recognises, into one line and exit code 2."""
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
