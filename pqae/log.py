"""Rank-0 logging (a run header with versions and device, the `done |` block, the ETA) and
atomic file output (JSON, and any file written under a temporary name)."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def print0(*args, rank: int = 0, **kwargs) -> None:
    if rank == 0:
        print(*args, **kwargs, flush=True)


def run_header(device: torch.device, world_size: int) -> str:
    """One line that makes a log reproducible: versions, device, world size."""
    import numpy
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    return (f"python {platform.python_version()} | torch {torch.__version__} | triton {triton_v}"
            f" | numpy {numpy.__version__} | device {device} ({name}) | world {world_size}")


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log_scalars(writer, step: int, scalars: dict[str, float]) -> None:
    """Write each `tag: value` to TensorBoard at `step`; no-op without a writer (ranks > 0)."""
    if writer is not None:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)


class Timer:
    """Wall time per step over the last logging interval (synchronises CUDA when read)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def ms_per_step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1000 * (time.perf_counter() - self.t0) / max(1, self.steps)


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (a temporary file, then a rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
    return path


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


def finish(summary: str, outputs: dict[str, str | Path | None], next_steps: list[str],
           rank: int = 0) -> None:
    """The last lines of every run: its final metrics, where its outputs are, what to run next."""
    lines = [f"done | {summary}"]
    lines += [f"  {what:11s} {where}" for what, where in outputs.items() if where]
    lines += [f"next: {cmd}" for cmd in next_steps]
    print0("\n".join(lines), rank=rank)
