"""pqae.profiling.breakdown: one figure per phase, said what it is. On CUDA the profiler gives
a phase two rows (the CPU range and its GPU annotation); with no CUPTI every GPU time is 0."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pqae import profiling

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class _Prof:
    def __init__(self, rows):
        self.rows = [SimpleNamespace(key=k, cpu_time_total=c, device_time_total=d,
                                     device_type=f"DeviceType.{t}") for k, c, d, t in rows]

    def key_averages(self):
        return self.rows


@pytest.mark.parametrize("order", [1, -1])
def test_gpu_time_per_phase_from_either_row(order):
    rows = [("phase:encoder", 9000.0, 4000.0, "CPU"), ("phase:encoder", 0.0, 4200.0, "CUDA"),
            ("phase:loss", 3000.0, 0.0, "CPU"), ("phase:loss", 0.0, 500.0, "CUDA"),
            ("aten::mm", 100.0, 50.0, "CPU")][::order]
    ms, what = profiling.breakdown(_Prof(rows), CUDA)
    # the CPU range's kernel time where it has one, else the GPU annotation's; never CPU time
    assert ms == {"encoder": 4.0, "loss": 0.5} and what == "GPU kernel time"


def test_no_gpu_time_falls_back_to_cpu_time_and_says_so():
    rows = [("phase:encoder", 9000.0, 0.0, "CPU"), ("phase:encoder", 0.0, 0.0, "CUDA")]
    ms, what = profiling.breakdown(_Prof(rows), CUDA)
    assert ms == {"encoder": 9.0} and "no GPU time" in what
    ms, what = profiling.breakdown(_Prof(rows[:1]), CPU)
    assert ms == {"encoder": 9.0} and what == "CPU time"


def test_real_profile_on_cpu():
    profiling.enabled(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with profiling.phase("work"):
                torch.randn(256, 256) @ torch.randn(256, 256)
    finally:
        profiling.enabled(False)
    ms, what = profiling.breakdown(prof, CPU)
    assert set(ms) == {"work"} and ms["work"] > 0 and what == "CPU time"


def test_compile_watch_sees_graphs_and_triton_compiles_inside_it():
    """pqae.bench.compile_watch, which guards the benchmark's timed steps: a torch.compile
    graph built inside it is listed, a cached one is not; Triton's compile hook is listed and
    restored afterwards."""
    import torch._dynamo
    import triton

    from pqae import bench

    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend="aot_eager")
    x = torch.randn(8)
    with bench.compile_watch() as seen:
        f(x)
    assert seen == ["1 torch.compile graph(s)"]
    with bench.compile_watch() as seen:
        f(x)
        triton.knobs.runtime.jit_cache_hook(repr="_knn_kernel[...]")  # as Triton calls it
    assert seen == ["Triton kernel _knn_kernel[...]"]
    assert triton.knobs.runtime.jit_cache_hook is None
    torch._dynamo.reset()
