"""The segmentation model shared by part segmentation and semantic segmentation.

API
---
``PointSegmenter(num_classes, num_categories=16, ...)``
    model(points (B, N, 3), category (B,) long | None) -> log-probabilities (B, N, num_classes).
    * ``num_categories=16``: ShapeNetPart: the object category enters as a one-hot
      embedding (16 -> 64), head input 3 * 1152 + 64 = 3392 at the reference width.
    * ``num_categories=0``: S3DIS: no category input (pass ``category=None``), head input
      1024 + 2 * 1152 = 3328.
    * ``init="default"``: PyTorch's default init everywhere (part segmentation);
      ``init="trunc_normal"``: Linear/Conv1d weights trunc-normal(0.02), biases 0, LayerNorm 1/0
      (semantic segmentation). Either way, a pretrained encoder then overwrites the encoder.
    * the width knobs (``dim``, ``depth``, ``fp_dims``, ``head_dims``, ...) default to the
      reference; tests shrink them.
    * ``model.encoder`` is a ``PointEncoder`` without class token.
``model.load_pretrained(path) -> dropped keys``
    Strict load of a pretraining checkpoint's encoder into ``model.encoder``; the documented
    pretraining-only keys and the class token / class pos are dropped and returned.
``propagate(xyz, centers, features, k=3) -> (B, N, C)``
    PointNet++ feature propagation: inverse-squared-distance interpolation from the k nearest
    centers.

Module names follow the reference (`label_conv`, `propagation.mlp_convs` / `mlp_bns`,
`convs1..3`, `bns1..2`) because the part-segmentation lr rule (its 10x group) selects parameters by
the substring `conv`. (The S3DIS reference suffixes its new layers with `_cls`; that only
matters for its unused `--optimizer_part only_new` and is not copied.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from pqae import checkpoint as ckpt
from pqae.model import PointEncoder


def feature_blocks_for(depth: int) -> tuple[int, ...]:
    """The last block of each third of the encoder, 1-based: (4, 8, 12) at depth 12, the
    reference's choice."""
    return (max(1, depth // 3), max(1, 2 * depth // 3), depth)


def propagate(xyz: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
              k: int = 3) -> torch.Tensor:
    """Interpolate center features to every point (PointNet++ feature propagation).

    xyz (B, N, 3), centers (B, G, 3), features (B, G, C) -> (B, N, C). Each point takes the
    features of its k nearest centers weighted by 1 / (squared distance + 1e-8), normalised
    to sum 1.
    """
    B, N, _ = xyz.shape
    k = min(k, centers.shape[1])
    idx = kernels.knn(xyz, centers, k, check=False)  # (B, N, k), nearest first
    near = centers.gather(1, idx.reshape(B, N * k, 1).expand(-1, -1, 3)).reshape(B, N, k, 3)
    d2 = (xyz[:, :, None] - near).square().sum(-1)  # (B, N, k)
    w = 1.0 / (d2 + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    # A dense (B, N, G) weight matrix and one bmm instead of gathering (B, N, k, C) features:
    # at the reference size that is 16 MB instead of 450 MB per batch of 16.
    weights = torch.zeros(B, N, centers.shape[1], device=xyz.device, dtype=features.dtype)
    weights.scatter_(2, idx, w.to(features.dtype))
    return torch.bmm(weights, features)


class FeaturePropagation(nn.Module):
    """[xyz (3), interpolated features (C)] -> 1x1 Conv + BN + ReLU per entry of `dims`."""

    def __init__(self, in_dim: int, dims: tuple[int, ...]):
        super().__init__()
        self.mlp_convs, self.mlp_bns = nn.ModuleList(), nn.ModuleList()
        for d in dims:
            self.mlp_convs.append(nn.Conv1d(in_dim, d, 1))
            self.mlp_bns.append(nn.BatchNorm1d(d))
            in_dim = d

    def forward(self, xyz: torch.Tensor, centers: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        """xyz (B, N, 3), centers (B, G, 3), features (B, G, C) -> (B, dims[-1], N)."""
        x = torch.cat([xyz, propagate(xyz, centers, features)], dim=-1).transpose(1, 2)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x


class PointSegmenter(nn.Module):
    """Per-point classifier on the PointEncoder backbone.

    Per center: the outputs of `feature_blocks` (1-based; blocks 4, 8, 12), each through the
    encoder's shared final LayerNorm, concatenated (3 x dim = 1152). Global: max and mean of
    those over the centers. Per point: feature propagation of the center features, then the
    head on [FP, max, mean(, category embedding)].
    """

    def __init__(self, num_classes: int, num_categories: int = 16, dim: int = 384,
                 depth: int = 12, heads: int = 6, drop_path_rate: float = 0.1,
                 num_group: int = 128, group_size: int = 32, embed_hidden: int = 128,
                 feature_blocks: tuple[int, ...] = (4, 8, 12),
                 fp_dims: tuple[int, ...] = (1536, 1024), head_dims: tuple[int, int] = (512, 256),
                 category_dim: int = 64, dropout: float = 0.5,
                 init: Literal["default", "trunc_normal"] = "default"):
        super().__init__()
        if any(not 1 <= b <= depth for b in feature_blocks):
            raise ValueError(f"feature_blocks {feature_blocks} must lie in 1..depth={depth}")
        if init not in ("default", "trunc_normal"):
            raise ValueError(f"init must be 'default' or 'trunc_normal', got {init!r}")
        self.num_classes, self.num_categories = num_classes, num_categories
        self.num_group, self.group_size = num_group, group_size
        self.feature_blocks = tuple(feature_blocks)
        self.encoder = PointEncoder(dim, depth, heads, drop_path_rate, embed_hidden,
                                    use_cls_token=False)  # no class token, as the reference
        center_dim = len(feature_blocks) * dim  # 1152
        if num_categories:
            # One-hot category -> 64; a Conv1d on a length-1 signal, as the reference.
            self.label_conv = nn.Sequential(
                nn.Conv1d(num_categories, category_dim, 1, bias=False),
                nn.BatchNorm1d(category_dim), nn.LeakyReLU(0.2))
        self.propagation = FeaturePropagation(3 + center_dim, fp_dims)
        head_in = fp_dims[-1] + 2 * center_dim + (category_dim if num_categories else 0)
        self.convs1, self.bns1 = nn.Conv1d(head_in, head_dims[0], 1), nn.BatchNorm1d(head_dims[0])
        self.dropout = nn.Dropout(dropout)
        self.convs2 = nn.Conv1d(head_dims[0], head_dims[1], 1)
        self.bns2 = nn.BatchNorm1d(head_dims[1])
        self.convs3 = nn.Conv1d(head_dims[1], num_classes, 1)
        self._init(init)

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Strictly load the encoder of a pretraining checkpoint (ours or a converted reference
        one) into self.encoder. Returns the dropped keys (pretraining-only ones and the class
        token / pos) for the caller to print; any other mismatch is an error naming the keys."""
        return ckpt.load_pretrained_encoder(self.encoder, path, drop=NO_CLS_DROPPED)

    def compile_fixed_shapes(self, **options) -> None:
        """torch.compile, in place, the encoder (the bulk of the compute, on fixed-shape
        patches); grouping and feature propagation (Triton kernels on a GPU) and the head stay
        eager. Parameter names, and so checkpoints, are unchanged."""
        self.encoder.compile(**options)

    def _init(self, init: str) -> None:
        for m in self.modules():
            if init == "default":
                # The part-segmentation reference has no custom init: PyTorch defaults everywhere,
                # the encoder included (it builds its own modules with default init).
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.LayerNorm, nn.BatchNorm1d)):
                    m.reset_parameters()
            elif isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, points: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        """points (B, N, 3), category (B,) long (None when num_categories == 0)
        -> log-probabilities (B, N, num_classes)."""
        B, N, _ = points.shape
        neighborhood, centers = kernels.group(points, self.num_group, self.group_size,
                                              check=False)  # (B, G, M, 3), (B, G, 3)
        _, _, layers = self.encoder(neighborhood, centers, return_layers=self.feature_blocks)
        feats = torch.cat([self.encoder.norm(x) for x in layers], dim=-1)  # (B, G, 1152)
        glob = [feats.amax(dim=1), feats.mean(dim=1)]  # 2 x (B, 1152)
        if self.num_categories:
            if category is None:
                raise ValueError("this model needs the object category of every cloud")
            onehot = F.one_hot(category.long().reshape(B), self.num_categories).to(feats.dtype)
            glob.append(self.label_conv(onehot[:, :, None])[:, :, 0])  # (B, 64)
        glob = torch.cat(glob, dim=-1)[:, :, None].expand(-1, -1, N)  # (B, 2*1152(+64), N)
        x = torch.cat([self.propagation(points, centers, feats), glob], dim=1)  # (B, 3392, N)
        x = self.dropout(F.relu(self.bns1(self.convs1(x))))
        x = F.relu(self.bns2(self.convs2(x)))
        return F.log_softmax(self.convs3(x), dim=1).transpose(1, 2)  # (B, N, num_classes)


# Besides the decoder side (ckpt.PRETRAIN_ONLY), the segmentation backbone has no class token,
# so the pretrained `cls_token` / `cls_pos` are ignored, as the reference does.
NO_CLS_DROPPED = ("encoder.cls_token", "encoder.cls_pos")
