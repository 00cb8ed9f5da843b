"""--plan: the device memory of a training step, estimated from its ops on the meta device,
against what the C allocator really holds during the same step on the CPU; the smallest
--accum-steps that fits a budget; the command line plans without writing anything."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain
from conftest import ROOT, small_pretrain_config
from pqae import costmodel, dist
from pqae.optim import param_groups


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def in_use() -> int:
    """Bytes the C allocator hands out now (heap and mmap'd blocks): torch's CPU tensors."""
    m = LIBC.mallinfo2()
    return m.uordblks + m.hblkhd


class PeakInUse(TorchDispatchMode):
    """The allocator's bytes in use, sampled after every op: its peak."""
    peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, in_use())
        return out


def measured_step(make_step) -> int:
    """What one steady-state step (the second) adds at its peak to what lives between steps,
    measured on the CPU."""
    torch.set_num_threads(1)  # no per-thread scratch in the figure
    step = make_step()
    step()
    base = in_use()
    with PeakInUse() as probe:
        probe.peak = base
        step()
    return probe.peak - base


@pytest.mark.skipif(LIBC is None, reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("batch,points", [(32, 512), (16, 1024)])
def test_the_meta_estimate_is_what_the_cpu_allocator_holds(tmp_path, batch, points):
    """Pretraining's step: the estimate's transient part (peak - static) against the C
    allocator's peak during the same real step on the CPU (seen 79.8 vs 80.0 MiB and 40.2 vs
    40.2), and the static part against the weights, buffers, optimizer state and inputs
    counted on the real objects."""
    cfg = small_pretrain_config(tmp_path, batch_size=batch, num_points=points, dim=96,
                                embed_hidden=64, procedural_points=2048, fused_adamw=False)
    est = costmodel.memory(pretrain.cost_model_of(cfg).make_step, False)
    env = dist.setup("cpu")
    model = pretrain.build_model(cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, foreach=True)
    clouds = torch.randn(batch, cfg.procedural_points, 3)
    perm = torch.arange(batch)

    def make_step():
        step = pretrain.make_train_step(cfg, model, model, opt, clouds, env)
        return lambda: step(0, perm)

    real = measured_step(make_step)
    assert est["peak"] - est["static"] == pytest.approx(real, rel=0.05), (est, real)
    tensors = [*model.parameters(), *model.buffers(), clouds, perm,
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    static = sum(t.numel() * t.element_size() for t in tensors)
    assert est["static"] == pytest.approx(static, rel=0.05), (est, static)


def test_the_smallest_accumulation_that_fits(tmp_path, capsys):
    """The reference recipe at a global batch of 512 on one process: ~40 GiB, so 24 GiB needs
    micro-batches; the first --accum-steps whose estimate (with the allocator's margin) fits a
    budget is the one named, and the peak falls with the micro-batch."""
    p = pretrain.plan(dataclasses.replace(pretrain.Config(), batch_size=512))
    rows = p["rows"]
    assert [r["accum_steps"] for r in rows][:4] == [1, 2, 4, 8]
    assert all(a["peak_bytes"] > b["peak_bytes"] for a, b in zip(rows, rows[1:]))
    for name, gib in (("24 GiB", 24), ("40 GiB", 40), ("80 GiB", 80)):
        k = p["smallest_accum_steps"][name]
        i = [r["accum_steps"] for r in rows].index(k)
        assert rows[i]["with_margin_bytes"] <= gib * 2**30
        assert i == 0 or rows[i - 1]["with_margin_bytes"] > gib * 2**30
    assert p["smallest_accum_steps"]["24 GiB"] > 1 and p["smallest_accum_steps"]["80 GiB"] == 1
    out = capsys.readouterr().out
    assert "fits 24 GiB: --accum-steps" in out and "512 samples" in out


def test_plan_on_the_command_line_writes_nothing(tmp_path):
    for script in ("pretrain.py", "finetune_cls.py", "partseg.py", "semseg.py"):
        proc = subprocess.run([sys.executable, str(ROOT / script), "--preset", "tiny", "--plan",
                               "--out-dir", str(tmp_path / "run")], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("plan | ") and "--accum-steps  micro-batch  peak" in proc.stdout
        assert not (tmp_path / "run").exists()
