"""Embeddings from a pretrained encoder, in three lines:

    import pqae
    encoder = pqae.load_encoder("runs/pretrain/ckpt-final", device="cuda")
    features = encoder.embed(points)        # raw clouds (B, N, 3) -> (B, 2C), e.g. (B, 768)

`load_encoder` builds the encoder from the checkpoint's own config (ours; a converted reference
checkpoint gets the reference's settings), loads it strictly and puts it in eval mode, so its
BatchNorm uses the running statistics of pretraining. `embed` prepares the clouds as
pretraining saw them (FPS down to the checkpoint's point count when a cloud has more, then
centre and unit-sphere scale), groups them with the pretraining grouping, and returns the
classifier's features: the class token's output concatenated with the max over the patch
outputs. It is batched and stays on the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import kernels
from pqae import checkpoint as ckpt
from pqae.data import _unit_sphere, fps_gather
from pqae.errors import BadInput
from pqae.model import PointEncoder

# What a checkpoint without a config (a converted reference one) was pretrained with.
REFERENCE = {"dim": 384, "depth": 12, "heads": 6, "embed_hidden": 128, "num_group": 64,
             "group_size": 32, "num_points": 1024}


class PointEmbedder(nn.Module):
    """A PointEncoder with the grouping and the point count it was pretrained with."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, embed_hidden: int = 128,
                 num_group: int = 64, group_size: int = 32, num_points: int = 1024):
        super().__init__()
        self.num_group, self.group_size, self.num_points = num_group, group_size, num_points
        self.encoder = PointEncoder(dim, depth, heads, 0.0, embed_hidden)

    @property
    def dim(self) -> int:
        """Width of the features `embed` returns (2 x the encoder's width)."""
        return 2 * self.encoder.dim

    def prepare(self, points: torch.Tensor) -> torch.Tensor:
        """Raw clouds (B, N, 3) -> (B, min(N, num_points), 3) as pretraining fed them: FPS
        (from each cloud's first point) down to num_points, then centred and scaled into the
        unit sphere."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise BadInput(f"embed expects clouds of shape (B, N, 3); got {tuple(points.shape)}")
        if points.shape[1] < self.num_group:
            raise BadInput(f"clouds of {points.shape[1]} points are fewer than the "
                           f"{self.num_group} patches of this encoder")
        if points.shape[1] > self.num_points:
            points = fps_gather(points, self.num_points)
        return _unit_sphere(points.float())

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Prepared clouds (B, n, 3) -> (B, 2C): concat[class token, max over patches]."""
        neighborhood, center = kernels.group(points, self.num_group, self.group_size, check=False)
        cls, patches = self.encoder(neighborhood, center)
        return torch.cat([cls, patches.amax(dim=1)], dim=-1)

    @torch.no_grad()
    def embed(self, points: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Raw clouds (B, N, 3), any N >= num_group, on the encoder's device -> (B, 2C) float32
        features, computed `batch_size` clouds at a time."""
        if self.training:
            raise BadInput("embed runs in eval mode (call .eval() after training it)")
        out = [self.features(self.prepare(points[i:i + batch_size]))
               for i in range(0, points.shape[0], batch_size)]
        return torch.cat(out) if out else points.new_zeros(0, self.dim)

    forward = embed


def encoder_config(path: str | Path) -> dict:
    """The embedder's settings for a pretraining checkpoint: its config (ours) or the
    reference's, with dim, depth and embed_hidden read off the weights when there is no config."""
    saved = ckpt.checkpoint_config(path) or {}
    shape = ckpt.encoder_shape(path)  # raises for a file with no encoder in it
    out = {k: saved.get(k, REFERENCE[k]) for k in REFERENCE}
    out.update({k: v for k, v in shape.items() if v is not None})
    return out


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> PointEmbedder:
    """The pretrained encoder of a pretraining checkpoint (directory or .safetensors, ours or
    converted from the reference), built from the checkpoint's own config, loaded strictly,
    in eval mode on `device`. A file that is not a pretraining checkpoint is an error that
    says what it holds."""
    model = PointEmbedder(**encoder_config(path))
    ckpt.load_pretrained_encoder(model.encoder, path)
    return model.to(device).eval()


def random_encoder(like: str | Path | None = None, device: str | torch.device = "cpu",
                   seed: int = 0) -> PointEmbedder:
    """A randomly initialised encoder (the pretraining init) of the same shape and grouping as
    the checkpoint `like` (the reference's without one), in eval mode: the baseline every
    pretrained encoder must beat. Its BatchNorm has never seen data (running mean 0, var 1)."""
    torch.manual_seed(seed)
    config = encoder_config(like) if like else dict(REFERENCE)
    return PointEmbedder(**config).to(device).eval()
