"""The `--benchmark-steps` mode shared by pretrain.py and finetune_cls.py.

Each script hands over its variants (the plain-PyTorch float32 path and the configured one)
as `make_step(variant) -> step(i)`; this module times them one after the other in one run on
one device and prints a table, the speed-up, the peak memory and a breakdown by phase.

    results = bench.run(variants, make_step, steps=50, batch_size=128, device=device)
    bench.report(results, ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

import kernels
from pqae import profiling
from pqae.log import Timer, print0

WARMUP_STEPS = 5
"""untimed steps before timing: Triton compilation, torch.compile, the CUDA allocator."""
PROFILED_STEPS = 3


@dataclass
class Variant:
    name: str
    cfg: Any
    """the script's Config for this variant (its amp/compile fields are reported)."""
    backend: str
    """kernels backend while it runs: "reference" (plain PyTorch) or "auto" (Triton on CUDA)."""


def variants(cfg, compare: bool) -> list[Variant]:
    """The variants of a script's config (a dataclass with amp, compile and fused_adamw): the
    configured path and, when compare, first the plain-PyTorch float32 path: the reference
    kernels, no amp, no compile, for-each AdamW (and no fast_point_all or cuda_graph where the
    script has them)."""
    out = [Variant("this config", cfg, kernels.get_backend())]
    if compare:
        off = {f: False for f in ("amp", "compile", "fused_adamw", "fast_point_all", "cuda_graph")
               if hasattr(cfg, f)}
        plain = dataclasses.replace(cfg, **off)
        out.insert(0, Variant("plain PyTorch fp32", plain, "reference"))
    return out


def run(variants: list[Variant], make_step: Callable[[Variant], Callable[[int], Any]], steps: int,
        batch_size: int, device: torch.device, phases: bool = True,
        rank: int = 0) -> dict[str, dict]:
    """Time `steps` steps of each variant after WARMUP_STEPS untimed ones, then (phases) profile
    PROFILED_STEPS more for the per-phase times, after one more untimed step. Returns
    {name: result} in the given order. Rank 0 prints each variant's timing as soon as it has
    it, before profiling it (so a run cut short still shows what it measured)."""
    results = {}
    for v in variants:
        kernels.set_backend(v.backend)
        try:
            step = make_step(v)
            i = 0
            for _ in range(WARMUP_STEPS):
                step(i)
                i += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            timer = Timer(device)
            with compile_watch() as compiled:
                for _ in range(steps):
                    step(i)
                    i += 1
                    timer.steps += 1
                ms = timer.ms_per_step()
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print0(f"benchmark | {v.name} | {ms:.2f} ms/step | {batch_size * 1000 / ms:.0f} "
                   f"shapes/s | peak {'-' if peak is None else f'{peak:.2f}'} GiB", rank=rank)
            phases_ms, phases_time = {}, None
            if phases:
                phases_ms, phases_time = _profile(step, i, device)
        finally:
            kernels.set_backend("auto")
        results[v.name] = {"ms_per_step": ms, "shapes_per_s": batch_size * 1000 / ms,
                           "peak_gib": peak, "backend": v.backend,
                           "amp": getattr(v.cfg, "amp", False),
                           "compile": getattr(v.cfg, "compile", False),
                           "fused_adamw": getattr(v.cfg, "fused_adamw", False),
                           "phases_ms": phases_ms, "phases_time": phases_time,
                           "compiled_in_timed_steps": compiled}
    return results


@contextlib.contextmanager
def compile_watch():
    """Yields a list that collects what compiles inside the block: Triton kernels (through
    Triton's compile hook) and torch.compile graphs (Dynamo's graph count)."""
    from torch._dynamo.utils import counters

    seen: list[str] = []
    graphs = counters["stats"]["unique_graphs"]
    runtime = prev = None
    try:
        import triton

        runtime = triton.knobs.runtime
        prev = runtime.jit_cache_hook
    except (ImportError, AttributeError):  # no Triton, or one without the knob
        pass

    def hook(*args, **kwargs):
        seen.append(f"Triton kernel {kwargs.get('repr', '?')}")
        return prev(*args, **kwargs) if prev else False  # False: compile as usual

    if runtime is not None:
        runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        if runtime is not None:
            runtime.jit_cache_hook = prev
        new = counters["stats"]["unique_graphs"] - graphs
        if new:
            seen.append(f"{new} torch.compile graph(s)")


def _profile(step, first: int, device: torch.device) -> tuple[dict[str, float], str]:
    profiling.enabled(True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        step(first)  # untimed: switching the labels on makes compiled parts recompile once
        first += 1
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(first, first + PROFILED_STEPS):
                step(i)
    finally:
        profiling.enabled(False)
    ms, what = profiling.breakdown(prof, device)
    return {k: v / PROFILED_STEPS for k, v in ms.items()}, what


def report(results: dict[str, dict], *, title: str, phase_order: list[str],
           nested: dict[str, str] | None = None, projections: list[tuple[str, int]] = ()) -> str:
    """The printed table. nested {outer: inner}: the outer phase's time is shown without the
    inner one's. projections [(what, steps)]: wall time of that many steps at each variant's
    measured ms/step."""
    nested = nested or {}
    lines = [title,
             f"{'path':<20} {'backend':>9} {'amp':>5} {'compile':>7} {'fused':>5} {'ms/step':>9} "
             f"{'shapes/s':>9} {'peak GiB':>8}"]
    for name, r in results.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"{name:<20} {r['backend']:>9} {str(r['amp']):>5} {str(r['compile']):>7} "
                     f"{str(r['fused_adamw']):>5} {r['ms_per_step']:>9.1f} "
                     f"{r['shapes_per_s']:>9.0f} {peak:>8}")
    names = list(results)
    for name, r in results.items():
        if r.get("compiled_in_timed_steps"):
            lines.append(f"WARNING: {name} compiled inside its timed steps (the warm-up missed a "
                         f"variant): {'; '.join(r['compiled_in_timed_steps'])}")
    if len(names) == 2:
        a, b = results[names[0]], results[names[1]]
        lines.append(f"speed-up of {names[1]} over {names[0]}: "
                     f"{a['ms_per_step'] / b['ms_per_step']:.2f}x")
    for what, n in projections:
        times = ", ".join(f"{name} {_hours(results[name]['ms_per_step'] * n / 1000)}"
                          for name in names)
        lines.append(f"projected {what} ({n} steps): {times}")
    if any(r["phases_ms"] for r in results.values()):
        whats = {r["phases_time"] for r in results.values() if r["phases_time"]}
        note = "; ".join(sorted(whats) + [f"{o} excludes {i}" for o, i in nested.items()])
        lines.append("phase breakdown, ms per step" + (f" ({note})" if note else "") + ":")
        lines.append(f"{'phase':<14}" + "".join(f"{n:>22}" for n in names))
        for ph in phase_order:
            row = []
            for n in names:
                p = results[n]["phases_ms"]
                v = p.get(ph)
                if v is not None and ph in nested:
                    v -= p.get(nested[ph], 0.0)
                row.append(f"{v:>22.2f}" if v is not None else f"{'-':>22}")
            lines.append(f"{ph:<14}" + "".join(row))
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m} min"
