"""`--amp`: bf16 autocast on the training device, or nothing.

    with amp.autocast(device, cfg.amp):
        out = model(points)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """bf16 autocast on device's type when enabled; a no-op context otherwise (so the float32
    path enters no autocast region at all, on any device type). cache=False: no cache of the
    weights' bf16 copies, which a CUDA graph capture needs (its casts must be in the graph)."""
    return torch.autocast(device.type, torch.bfloat16, cache_enabled=cache) if enabled \
        else nullcontext()
