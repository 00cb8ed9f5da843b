"""What every converter shares: the error type, the safe pickle reader, the CLI. (Their
all-or-nothing output file is `pqae.log.atomic_output`.)"""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import tyro


class ConversionError(ValueError):
    """A source that does not match its expected layout; the message lists every problem
    found (file, and line where there is one), not just the first."""


# The callables NumPy's pickles name, taken from NumPy itself so that both spellings of their
# module (numpy.core in NumPy 1, numpy._core in NumPy 2) resolve to the same objects.
# Arrays pickle through `_reconstruct` (protocols 2-4) or `_frombuffer` (protocol 5).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.float32(0).__reduce__()[0]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Protocol 2 stores an array's raw bytes as `_codecs.encode(text, 'latin1')`: allowed for
    exactly that (a str, latin-1), nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, "
                                     f"{encoding!r}): only latin-1 text is allowed")
    return text.encode("latin-1")


_NUMPY_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and NumPy arrays/scalars, nothing else: any
    other global (os.system, builtins.eval, a class with __reduce__, ...) is refused by name
    before it can be called."""

    def find_class(self, module: str, name: str):
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only NumPy "
                                         f"arrays are allowed in a data set pickle") from None


def read_numpy_pickle(path: str | Path, what: str) -> object:
    """Load a released data set pickle without letting it run code: the file must start with a
    protocol 2-5 pickle header, and is read by `NumpyOnlyUnpickler`. `what` names the expected
    file in the errors (ConversionError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected {what})")
    raw = path.read_bytes()
    if len(raw) < 2 or raw[0] != 0x80 or not 2 <= raw[1] <= 5:
        raise ConversionError(f"{path}: not a pickle of protocol 2-5 (those start with byte 0x80 "
                              f"and the protocol; this starts with {raw[:8]!r}); expected {what}")
    try:
        return NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except Exception as e:  # UnpicklingError, or a truncated/corrupt stream
        raise ConversionError(f"{path}: {type(e).__name__}: {e}") from e


def run(config_cls, main) -> None:
    """`main(tyro.cli(config_cls))`; a ConversionError or a missing file prints its message
    (no traceback) and exits 1."""
    try:
        main(tyro.cli(config_cls))
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
