"""Shared test fixtures: where the real data slices live and a small pretraining config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the Triton interpreter. Triton reads this variable
# when it is first imported, so it is set here, before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
AIRPLANES = SHARED_DATA / "modelnet40_airplanes" / "airplanes_2048.npz"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (the real data slices live in ../shared/data)")
    return path


def small_pretrain_config(tmp_path: Path, **overrides):
    """A pretraining config small enough for a CPU test: a few seconds per dozen steps."""
    from pretrain import Config
    base = dict(data="procedural", procedural_shapes=64, num_points=256, dim=48, depth=2,
                heads=2, decoder_depth=1, num_group=16, group_size=16, embed_hidden=16,
                batch_size=16, lr=1e-3, epochs=2, warmup_epochs=1, log_every=1, vis_every=0,
                device="cpu", out_dir=str(tmp_path / "run"))
    base.update(overrides)
    return dataclasses.replace(Config(), **base)


class NoOpOptimizer:
    """Stands in for AdamW where a test runs a training step under FakeTensorMode: AdamW keeps
    its step counter as a CPU scalar, which is not a device sync but would trip the check."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass
