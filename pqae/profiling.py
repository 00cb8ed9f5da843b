"""Named phases of a training step for the benchmark's time breakdown.

`phase("encoder")` marks a region for torch.profiler (CPU time, and on CUDA the device time of
the kernels launched inside it); `breakdown` turns a profile into milliseconds per phase. It is a no-op unless `enabled(True)` was called, so the
training step pays nothing for the labels.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

_ENABLED = False


def enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = flag


def phase(name: str):
    if _ENABLED:
        return torch.profiler.record_function(f"phase:{name}")
    return _tracked(name) if _TRACKING else nullcontext()


_TRACKING = False
_STACK: list[str] = []


def tracking(flag: bool) -> None:
    """Keep the phase stack for current() (pqae.costmodel, which records a step op by op)."""
    global _TRACKING
    _TRACKING = flag
    _STACK.clear()


def current() -> str | None:
    """The innermost phase being run (when tracking), else None."""
    return _STACK[-1] if _STACK else None


@contextmanager
def _tracked(name: str):
    _STACK.append(name)
    try:
        yield
    finally:
        _STACK.pop()


def breakdown(prof, device: torch.device) -> tuple[dict[str, float], str]:
    """Milliseconds per phase from a finished torch.profiler run, summed over its steps, and
    what they measure. On a GPU: the time of the kernels each phase launched (its CPU range's
    device time; on CUDA a phase has a second row, the GPU annotation, used when the first has
    none). If the profiler recorded no GPU time at all (no CUPTI), CPU time, and says so."""
    cpu, dev = {}, {}
    for evt in prof.key_averages():
        if not evt.key.startswith("phase:"):
            continue
        name = evt.key[len("phase:"):]
        t = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        on_cpu = str(getattr(evt, "device_type", "CPU")).endswith("CPU")
        if on_cpu:
            cpu[name] = evt.cpu_time_total
        if t and (on_cpu or not dev.get(name)):  # the CPU range's figure first
            dev[name] = t
    if device.type != "cuda":
        return {k: v / 1000 for k, v in cpu.items()}, "CPU time"
    if not any(dev.values()):
        return ({k: v / 1000 for k, v in cpu.items()},
                "CPU time: the profiler recorded no GPU time (is CUPTI available?)")
    return {k: dev.get(k, 0.0) / 1000 for k in cpu.keys() | dev.keys()}, "GPU kernel time"
