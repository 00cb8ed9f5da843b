"""Errors that are the user's to fix: the scripts print them in a line or two, without a
traceback, and exit with status 2 (`pqae.cli.run`). Each also is the builtin error it stands
for, so `except FileNotFoundError` and the like still catch it."""

from __future__ import annotations

import zipfile
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the command line or the input files; the message says how to fix it."""

    def __str__(self) -> str:  # KeyError's str() would quote the message onto one line
        return str(self.args[0]) if self.args else ""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class BadInput(UserError, ValueError):
    """An input has the wrong layout, shape or values, or flags contradict each other."""


class CheckpointMismatch(UserError, KeyError):
    """A checkpoint does not fit the model it is loaded into."""


class WriteFailed(UserError, OSError):
    """A file of the run could not be written (a full disk, a read-only or unwritable
    directory); the message names it and says what was kept."""


@contextmanager
def reading(path, expected: str):
    """Around the whole read of a data file: a file that cannot be read as `expected` (not
    HDF5 or .npz, truncated, an object array, a damaged dataset) is a BadInput naming the
    file, the expected layout and the cause in one line, instead of a library's traceback."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError,
            zipfile.BadZipFile) as e:
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise BadInput(f"{path} cannot be read as {expected}: {type(e).__name__}: {cause}") from None

