"""Per-step seeds. Every random draw of a training step is a function of (seed, step, rank),
so a resumed run replays exactly what an uninterrupted one draws, without saving RNG state."""

from __future__ import annotations

import torch

# Offset of the batch-shared stream: it never equals a rank's stream (whose seeds stay far
# below 2**62 for any realistic seed, step and world size).
_SHARED = 2**62


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of rank `rank`'s own draws at `step` (the global torch RNG: sampling,
    augmentation, DropPath)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def shared_seed(seed: int, step: int) -> int:
    """The seed of the draws every rank makes identically at `step` (a batch-wide crop ratio
    or point subset), independent of every rank's own stream."""
    return _SHARED + step_seed(seed, step)


def epoch_perm(seed: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The data order of an epoch: a permutation of n, a function of (seed, epoch) only. On a
    GPU, pass the device: moved there once per epoch, a step's indices need no (synchronising)
    host-to-device copy."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).to(device)
