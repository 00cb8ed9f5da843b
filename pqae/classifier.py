"""Point-cloud classifier for fine-tuning: the shared encoder + a classification head.

    model = PointClassifier(num_classes=15, head="full", num_group=128)
    dropped = model.load_pretrained("runs/pretrain/ckpt-epoch-300")  # strict, encoder only
    logits = model(points)  # (B, N, 3) -> (B, num_classes)

Every parameter that belongs to the head or the class token has `cls` in its name
(`cls_head.*`, `encoder.cls_token`, `encoder.cls_pos`): the optimizer's 10x lr group and
the freezing rule of the linear/mlp3 protocols select parameters by that substring,
exactly as the reference does with `cls_head_finetune.*`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import kernels
from pqae.checkpoint import load_pretrained_encoder
from pqae.model import PointEncoder
from pqae.profiling import phase

HEADS = ("full", "linear", "mlp3")


def make_head(kind: str, in_dim: int, num_classes: int, hidden: int = 256,
              dropout: float = 0.5) -> nn.Sequential:
    """`linear`: one Linear. `full` and `mlp3`: Linear, BN, ReLU, Dropout, Linear, BN,
    ReLU, Dropout, Linear. A Sequential in both cases, so the indices of the Linear/BN layers
    (0, 1, 4, 5, 8) are those of the reference's `cls_head_finetune`."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, num_classes))
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes))


class PointClassifier(nn.Module):
    """Group (FPS + kNN) -> PointEncoder -> concat[class token, max over patches] -> head.

    head: "full" (everything trains), "linear" or "mlp3" (only `cls`-named parameters train,
    see `freeze_for_protocol`). Initialisation as the reference: PyTorch defaults everywhere (the
    head keeps them even when a pretrained encoder is loaded) except trunc-normal(0.02)
    `cls_token`/`cls_pos`.
    """

    def __init__(self, num_classes: int = 40, head: str = "full", num_group: int = 64,
                 group_size: int = 32, drop_path_rate: float = 0.2, dim: int = 384,
                 depth: int = 12, heads: int = 6, embed_hidden: int = 128):
        super().__init__()
        self.head_kind, self.num_group, self.group_size = head, num_group, group_size
        self.encoder = PointEncoder(dim, depth, heads, drop_path_rate, embed_hidden)
        # PointEncoder starts from the pretraining init; the reference classifier never
        # runs that, so put every layer back to PyTorch's default init (class token/pos stay
        # trunc-normal, as the reference's).
        for m in self.encoder.modules():
            if m is not self.encoder and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.cls_head = make_head(head, 2 * dim, num_classes)
        self.check_inputs = True
        """Raise on NaN/inf input points (a host sync on the GPU; finetune_cls.py, whose data
        were validated at load time, switches it off there)."""
        self.freeze_for_protocol()

    def freeze_for_protocol(self) -> None:
        """In `linear`/`mlp3` every parameter whose name lacks `cls` is frozen (class
        token and its positional embedding stay trainable). The module itself is NOT put in
        eval mode: the reference trains in train(), so frozen BatchNorm layers keep using
        batch statistics and DropPath stays active."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.head_kind == "full" or "cls" in name)

    def compile_fixed_shapes(self, **options) -> None:
        """torch.compile, in place, the encoder and the head; the grouping (Triton kernels on
        a GPU) stays eager. Parameter names, and so checkpoints, are unchanged."""
        for m in (self.encoder, self.cls_head):
            m.compile(**options)

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Strictly load a pretraining checkpoint's encoder; returns the dropped
        pretraining-only keys (decoder side), which the caller prints."""
        return load_pretrained_encoder(self.encoder, path)

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) -> (B, 2C): class-token output and max-pooled patch outputs."""
        with phase("grouping"):
            neighborhood, center = kernels.group(points, self.num_group, self.group_size,
                                                 check=self.check_inputs)
        with phase("encoder"):
            cls, patches = self.encoder(neighborhood, center)  # (B, C), (B, G, C)
            return torch.cat([cls, patches.amax(dim=1)], dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        features = self.features(points)
        with phase("head"):
            return self.cls_head(features)  # (B, num_classes)
