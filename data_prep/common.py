"""What every converter shares: the error type, the all-or-nothing output file, the CLI."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import tyro


class ConversionError(ValueError):
    """A source that does not match its expected layout; the message lists every problem
    found (file, and line where there is one), not just the first."""


@contextmanager
def atomic_output(path: Path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block finishes
    without an exception, otherwise remove it. The output exists only when complete."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(config_cls, main) -> None:
    """`main(tyro.cli(config_cls))`; a ConversionError prints its list and exits 1."""
    try:
        main(tyro.cli(config_cls))
    except ConversionError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
