"""Named phases of a training step for the benchmark's time breakdown.

`phase("encoder")` marks a region for torch.profiler (CPU time, and on CUDA the device time of
the kernels launched inside it). It is a no-op unless `enabled(True)` was called, so the
training step pays nothing for the labels.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

_ENABLED = False


def enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = flag


def phase(name: str):
    return torch.profiler.record_function(f"phase:{name}") if _ENABLED else nullcontext()


def breakdown(prof) -> dict[str, float]:
    """Milliseconds per phase from a finished torch.profiler run, summed over its steps
    (device time where a GPU was profiled, else CPU time)."""
    out = {}
    for evt in prof.key_averages():
        if evt.key.startswith("phase:"):
            dev = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
            out[evt.key[len("phase:"):]] = (dev or evt.cpu_time_total) / 1000
    return out
