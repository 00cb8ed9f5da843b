"""`--amp`: bf16 autocast on the training device, or nothing.

    with amp.autocast(device, cfg.amp):
        out = model(points)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on device's type when enabled; a no-op context otherwise (so the float32
    path enters no autocast region at all, on any device type)."""
    return torch.autocast(device.type, torch.bfloat16) if enabled else nullcontext()
