"""Point-PQAE models: the shared point-cloud encoder and the cross-reconstruction pretrainer.

Shapes: B batch, N points, G patches (groups), M points per patch, C token width.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from pqae import syncbn
from pqae.data import rotate_y
from pqae.profiling import phase

# ---------------------------------------------------------------------------------------------
# Shared building blocks


@dataclass(frozen=True)
class EncoderShape:
    """The config fields that fix the shape of a PointEncoder, alike in every script's Config
    (`checkpoint.ENCODER_FIELDS`): a checkpoint carries them, and `--pretrained` / `--eval-ckpt`
    bring them. The defaults are the reference's."""
    dim: int = 384
    """transformer width (channels per token; pretraining's decoder has the same)."""
    depth: int = 12
    """number of transformer blocks of the encoder."""
    heads: int = 6
    """attention heads per transformer block."""
    embed_hidden: int = 128
    """width of the patch embedding's first layer (128 -> 256 -> 512 in the reference)."""


TINY_ENCODER = dict(dim=96, depth=4, heads=3, embed_hidden=32)
"""The encoder of every script's `--preset tiny` (the same in all five, so that a tiny
pretraining checkpoint fits every tiny downstream run): dim, depth, heads, embed_hidden."""


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the whole residual branch of a sample with prob. p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
    return x * mask.bernoulli_(keep).div_(keep)


class PatchEmbed(nn.Module):
    """Mini-PointNet over each patch: (P, M, 3) -> (P, C).

    The reference uses 1x1 Conv1d on channels-first tensors; a Linear on channels-last points is
    the same map, and BatchNorm over the flattened (P*M, C) points is the same statistic as
    BatchNorm1d over (P, C, M). Its second conv sees concat(patch max, point feature); here fc3
    (same parameters) is applied to the two halves separately, the max's part once per patch,
    so the 512-channel concatenation is never built and the per-point GEMM has K = 256, not
    512 (the same map, to float32 rounding). The maxima are torch.max's, as the reference's:
    the gradient of tied points (duplicates) goes to one of them, and the backward is one
    scatter instead of amax's compare, count, divide and multiply over every point.

    `fused` (the scripts' --fused-embed): two ops. fc1, bn1, the ReLU, fc2 and the max over
    each patch are `kernels.point_mlp_max`, with bn1 in affine form from the statistics of
    fc1's output that the points' mean and covariance give exactly (`syncbn.linear_affine`);
    bn2, the ReLU, fc4 and the max are `kernels.linear_patch_max`, with bn2 in affine form from
    its statistics (`syncbn.affine`); both keep the running statistics as the BatchNorm would.
    Their Triton kernels on a GPU write none of fc1's, bn1's and the ReLU's (P*M, 128)
    outputs, fc4's (P*M, C) output or its gradient, or bn2's and the ReLU's (P*M, 512)
    outputs. The same map and gradients up to float rounding (off: as above). The points get
    no gradient (they are data).
    """

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        h1, h2, h3 = hidden, 2 * hidden, 4 * hidden  # 128, 256, 512 in the reference
        self.fc1, self.bn1, self.fc2 = nn.Linear(3, h1), nn.BatchNorm1d(h1), nn.Linear(h1, h2)
        self.fc3, self.bn2, self.fc4 = nn.Linear(2 * h2, h3), nn.BatchNorm1d(h3), nn.Linear(h3, dim)
        self.fused = False

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        with phase("patch_embed"):
            return self._forward(patches)

    def _forward(self, patches: torch.Tensor) -> torch.Tensor:
        P, M, _ = patches.shape
        if self.fused:  # fc1, bn1 (statistics from the points' moments), ReLU, fc2 and the max
            scale, shift = syncbn.linear_affine(self.bn1, patches.reshape(P * M, 3),
                                                self.fc1.weight, self.fc1.bias)
            x, glob = kernels.point_mlp_max(patches.detach(), self.fc1.weight, self.fc1.bias,
                                            self.fc2.weight, self.fc2.bias, scale=scale,
                                            shift=shift)
            x = x.reshape(P * M, -1)
        else:
            x = self.fc2(F.relu(self.bn1(self.fc1(patches.reshape(P * M, 3)))))  # (P*M, 256)
            glob = x.reshape(P, M, x.shape[-1]).max(dim=1).values  # (P, 256) patch-global
        h2 = x.shape[-1]
        # fc3 of concat(global, local) = W_g global + W_l local + b: the global part once per
        # patch, the local part per point; the (P*M, 512) concatenation never exists.
        w_glob, w_loc = self.fc3.weight[:, :h2], self.fc3.weight[:, h2:]  # global came first
        g = F.linear(glob, w_glob, self.fc3.bias)  # (P, 512)
        local = F.linear(x, w_loc).reshape(P, M, -1)
        x = (local + g[:, None]).reshape(P * M, -1)
        if self.fused:  # bn2, ReLU, fc4 and the max in one op; bn2's statistics from x
            scale, shift = syncbn.affine(self.bn2, x)
            return kernels.linear_patch_max(local, self.fc4.weight, self.fc4.bias, add=g,
                                            scale=scale, shift=shift)
        x = self.fc4(F.relu(self.bn2(x)))  # (P*M, C)
        return x.reshape(P, M, -1).max(dim=1).values  # (P, C)


def fuse_embed(model: nn.Module, on: bool) -> nn.Module:
    """--fused-embed: every PatchEmbed of `model` ends in kernels.linear_patch_max (or not)."""
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            m.fused = on
    return model


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5, as the reference
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with per-sample DropPath on both branches."""

    def __init__(self, dim: int, heads: int, drop_path: float = 0.0, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly spaced 0 .. rate over the depth, as torch.linspace(0, r, depth)."""
    return [float(r) for r in torch.linspace(0, rate, depth)]


class PointEncoder(nn.Module):
    """The shared encoder: patch tokens + centre embedding + class token, then `depth`
    blocks with the positional embedding re-added before every block, then a final LayerNorm.

    forward(neighborhood (B, G, M, 3), center (B, G, 3)) -> (cls (B, C), patches (B, G, C)).
    `return_layers` (1-based block indices) also returns those blocks' raw outputs (for the
    segmentation heads). With use_cls_token=False (the segmentation backbone) there
    is no class token or class pos at all: cls is None and the raw outputs are (B, G, C).
    """

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6,
                 drop_path_rate: float = 0.1, embed_hidden: int = 128,
                 use_cls_token: bool = True):
        super().__init__()
        self.dim, self.use_cls_token = dim, use_cls_token
        self.patch_embed = PatchEmbed(dim, embed_hidden)
        self.pos_embed = nn.Sequential()  # Linear 3->128, GELU, Linear 128->C
        self.pos_embed.fc1 = nn.Linear(3, 128)
        self.pos_embed.act = nn.GELU()
        self.pos_embed.fc2 = nn.Linear(128, dim)
        if use_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, r) for r in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference encoder's own init, before the pretraining model's re-init:
        trunc-normal(0.02) for Linear/conv weights and the class token/pos, zero biases, norms at
        1/0. (The timm truncation at +-2 never bites.)"""
        if self.use_cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor,
                return_layers: tuple[int, ...] = ()):
        B, G, M, _ = neighborhood.shape
        tokens = self.patch_embed(neighborhood.reshape(B * G, M, 3)).reshape(B, G, -1)
        pos = self.pos_embed(center)  # (B, G, C)
        x, first = tokens, 0
        if self.use_cls_token:
            x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1+G, C)
            pos = torch.cat([self.cls_pos.expand(B, -1, -1), pos], dim=1)
            first = 1
        layers = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x + pos)
            if i in return_layers:
                layers.append(x)
        x = self.norm(x)
        cls = x[:, 0] if first else None
        if return_layers:
            return cls, x[:, first:], layers
        return cls, x[:, first:]


# ---------------------------------------------------------------------------------------------
# Pretraining pieces


def crop_view(points: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop and normalisation of one decoupled view, batched on the device.

    points (B, N, 3) -> view (B, k, 3) in [-1, 1] per axis, k = floor(N * ratio), and the
    bbox centre (B, 3) of the cropped points in the input frame. Each sample: a random seed
    point and its k nearest points sorted by distance (so the seed is the view's first point
    and hence its first FPS centre), then per-axis min-max normalisation (anisotropic).
    """
    B, N, _ = points.shape
    if ratio >= 1.0:
        # Ablation path of the reference (min_crop_rate == 1): no crop, no scaling, the view is
        # only translated to its bbox centre.
        centre = (points.amin(1) + points.amax(1)) / 2
        return points - centre[:, None], centre
    seed = torch.randint(0, N, (B,), device=points.device)
    return _crop(points, seed, int(math.floor(N * ratio)))


def _crop(points: torch.Tensor, seed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """crop_view given its draw: seed (B,) the index of each sample's seed point."""
    B = points.shape[0]
    seed_pt = points[torch.arange(B, device=points.device), seed]  # (B, 3)
    dist = (points - seed_pt[:, None]).square().sum(-1)  # (B, N), ordered as the true distance
    idx = dist.topk(k, dim=1, largest=False, sorted=True).indices  # (B, k) nearest first
    crop = points.gather(1, idx[..., None].expand(-1, -1, 3))  # (B, k, 3)
    lo, hi = crop.amin(1, keepdim=True), crop.amax(1, keepdim=True)  # (B, 1, 3)
    return 2 * (crop - lo) / (hi - lo + 1e-6) - 1, ((lo + hi) / 2)[:, 0]


def crop_rotate(points: torch.Tensor, seed: torch.Tensor, angles: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoupled view given its draws (seed (B,) indices, angles (B,) radians): no random
    draw of its own, so torch.compile(dynamic=True) compiles it once for every k
    (`PointPQAE.compile_fixed_shapes`)."""
    view, centre = _crop(points, seed, k)
    return rotate_y(view, angles), centre


def decoupled_view(points: torch.Tensor, ratio: float, crop_fn=crop_rotate
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoupled view: the crop of `crop_view`, then a random rotation about y per
    sample (whose angle the model never sees). -> view (B, k, 3), bbox centre (B, 3).
    The draws (seed point, angle; in that order) are made here, the rest by crop_fn
    (`crop_rotate`, or its compiled version)."""
    B, N, _ = points.shape
    if ratio >= 1.0:
        view, centre = crop_view(points, ratio)
        angles = torch.rand(B, device=points.device) * (2 * math.pi)
        return rotate_y(view, angles), centre
    seed = torch.randint(0, N, (B,), device=points.device)
    angles = torch.rand(B, device=points.device) * (2 * math.pi)
    return crop_fn(points, seed, angles, int(math.floor(N * ratio)))


def vrpe(center: torch.Tensor, offset: torch.Tensor, dim: int) -> torch.Tensor:
    """View-relative positional embedding, fixed sine-cosine of 6 coordinates.

    center (B, G, 3) in the view's own frame, offset (B, 3) = other view's bbox centre minus
    this view's, in the global frame. -> (B, G, dim), laid out
    [sin x | cos x | sin y | cos y | sin z | cos z | sin dx | cos dx | ...], dim/12 freqs each.
    """
    B, G, _ = center.shape
    nf = dim // 12
    omega = 1.0 / 10000 ** (torch.arange(nf, device=center.device, dtype=torch.float32) / nf)
    u = torch.cat([center, offset[:, None].expand(B, G, 3)], dim=-1).float()  # (B, G, 6)
    ang = u[..., None] * omega  # (B, G, 6, nf)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(B, G, 12 * nf)


class PositionalQuery(nn.Module):
    """Positional-query cross-attention: queries from the target view's VRPE, keys and
    values from the other view's patch tokens; no residual, no norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        B, L, C = query.shape
        H = self.heads
        q = self.q(query).reshape(B, L, H, C // H).transpose(1, 2)
        k, v = self.kv(source).reshape(B, source.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Decoder(nn.Module):
    """`depth` blocks without any positional embedding, then LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path_rate: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, r) for r in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(dim)
        # The reference's Xavier init of the decoder is entirely overwritten by the
        # pretraining model's later re-init, so it is not repeated here.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class PointPQAE(nn.Module):
    """Point-PQAE pretraining model. `PointPQAE()` is the reference configuration.

    model(points (B, N, 3)) -> {"loss_view1", "loss_view2", "loss"}: two decoupled views of
    every cloud, each reconstructed from the other through the positional query.
    model.forward_views(view1, view2, offset) -> the same dict for two given views.
    """

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, decoder_depth: int = 4,
                 num_group: int = 64, group_size: int = 32, drop_path_rate: float = 0.1,
                 min_crop_rate: float = 0.6, embed_hidden: int = 128):
        super().__init__()
        if dim % 12:
            raise ValueError(f"dim must be a multiple of 12 (VRPE uses dim/12 freqs), got {dim}")
        self.num_group, self.group_size, self.min_crop_rate = num_group, group_size, min_crop_rate
        self.encoder = PointEncoder(dim, depth, heads, drop_path_rate, embed_hidden)
        self.decoder = Decoder(dim, decoder_depth, heads, drop_path_rate)
        self.query_attn = PositionalQuery(dim, heads)
        self.head = nn.Linear(dim, 3 * group_size)
        self.crop_fn = crop_rotate
        """the views' crop and rotation given their draws (compiled by compile_fixed_shapes)"""
        self.check_inputs = True
        """Raise on NaN/inf input points (a host sync on the GPU; training loops whose data was
        validated at load time switch it off there)."""
        self._reference_init()

    def compile_fixed_shapes(self, **options) -> None:
        """torch.compile, in place, the parts whose input shapes never change: the encoder
        (patches (B, G, M, 3) whatever the crop), the positional query, the decoder and the
        head; parameter names, and so checkpoints, are unchanged. A view's size k follows the
        step's crop ratio: its crop and rotation (`crop_rotate`) are compiled once with k
        dynamic (a static k would recompile every step), their random draws staying eager in
        the same order: a few fused kernels per view instead of ~30 launches. The grouping
        stays eager (its Triton kernels)."""
        for m in (self.encoder, self.query_attn, self.decoder, self.head):
            m.compile(**options)
        self.crop_fn = torch.compile(crop_rotate, dynamic=True, **options)

    def _reference_init(self) -> None:
        # The reference's last init step: every Linear outside the patch embedding (whose layers
        # are Conv1d in the reference and keep their trunc-normal init) gets N(0.02, 0.01^2)
        # weights, zero bias.
        patch = set(self.encoder.patch_embed.modules())
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in patch:
                nn.init.normal_(m.weight, mean=0.02, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def draw_crop_ratios(self, rng: random.Random | None = None) -> tuple[float, float]:
        """One crop ratio per view for the whole batch, U[min_crop_rate, 1). A host-side
        draw (Python's `random`, or `rng`): the ratios fix the views' shapes, so they must be
        known on the host without a device sync, and be the same on every rank."""
        if self.min_crop_rate >= 1.0:
            return 1.0, 1.0
        rng = rng if rng is not None else random
        return tuple(self.min_crop_rate + (1.0 - self.min_crop_rate) * rng.random()
                     for _ in range(2))

    def forward(self, points: torch.Tensor, crop_ratios: tuple[float, float] | None = None,
                return_outputs: bool = False) -> dict[str, torch.Tensor]:
        """points (B, N, 3): the (globally rotated, unit-sphere) batch. Randomness comes from the
        global torch RNG (per-sample crop seeds, view rotations, DropPath) and `crop_ratios`
        (drawn with `draw_crop_ratios` from Python's `random` when None)."""
        patches, views = self.patches(points, crop_ratios)
        out = self.forward_patches(*patches)
        return {**out, **views} if return_outputs else {n: out[n] for n in self.LOSSES}

    LOSSES = ("loss", "loss_view1", "loss_view2")

    def patches(self, points: torch.Tensor, crop_ratios: tuple[float, float] | None = None
                ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """The part of `forward` whose shapes follow the step's crop ratios: the two views and
        their grouping. Returns ((neigh1, center1, neigh2, center2, offset), {view1, view2}):
        fixed shapes (B, G, M, 3), (B, G, 3) and (B, 3), `forward_patches`'s arguments."""
        if self.check_inputs and not bool(torch.isfinite(points).all()):
            raise ValueError(f"points of shape {tuple(points.shape)} contain NaN or inf")
        r1, r2 = crop_ratios if crop_ratios is not None else self.draw_crop_ratios()
        with phase("views"):
            view1, centre1 = decoupled_view(points, r1, self.crop_fn)
            view2, centre2 = decoupled_view(points, r2, self.crop_fn)
        return self.group_views(view1, view2, centre2 - centre1), {"view1": view1, "view2": view2}

    def group_views(self, view1: torch.Tensor, view2: torch.Tensor, offset: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
        """(neigh1, center1, neigh2, center2, offset): both views' patches and centres."""
        G, M = self.num_group, self.group_size
        with phase("grouping"):  # both views in one FPS and one kNN launch on the GPU
            (neigh1, center1), (neigh2, center2) = kernels.group_views(
                (view1, view2), G, M, check=self.check_inputs)  # (B, G, M, 3), (B, G, 3)
        return neigh1, center1, neigh2, center2, offset

    def forward_views(self, view1: torch.Tensor, view2: torch.Tensor, offset: torch.Tensor,
                      return_outputs: bool = False) -> dict[str, torch.Tensor]:
        """view1 (B, k1, 3), view2 (B, k2, 3), offset (B, 3) = bbox centre 2 - bbox centre 1."""
        out = self.forward_patches(*self.group_views(view1, view2, offset))
        return {**out, "view1": view1, "view2": view2} if return_outputs else \
            {n: out[n] for n in self.LOSSES}

    def forward_patches(self, neigh1: torch.Tensor, center1: torch.Tensor, neigh2: torch.Tensor,
                        center2: torch.Tensor, offset: torch.Tensor) -> dict[str, torch.Tensor]:
        """The part of the step whose shapes never change (what --cuda-graph captures): both
        views' patches (B, G, M, 3) and centres (B, G, 3) and the offset (B, 3) -> the losses
        and the outputs (patches, centres and predictions (B, G, M, 3))."""
        G, M = self.num_group, self.group_size
        # Separate encoder calls, as the reference: per-view BatchNorm statistics and DropPath.
        with phase("encoder"):
            _, tokens1 = self.encoder(neigh1, center1)
            _, tokens2 = self.encoder(neigh2, center2)
        with phase("decoder"):
            dim = tokens1.shape[-1]
            query1 = vrpe(center1, offset, dim).to(tokens1.dtype)
            query2 = vrpe(center2, -offset, dim).to(tokens2.dtype)
            # Cross reconstruction: view 1 from view 2's tokens, and the reverse.
            pred1 = self.head(self.decoder(self.query_attn(query1, tokens2)))  # (B, G, 3M)
            pred2 = self.head(self.decoder(self.query_attn(query2, tokens1)))
        B = neigh1.shape[0]
        pred1, pred2 = pred1.reshape(B * G, M, 3), pred2.reshape(B * G, M, 3)
        with phase("loss"):
            # CD-L2 of each view: mean squared nearest distance pred->target plus
            # target->pred; on the GPU one launch for both views, forward and gradient. No NaN
            # guard here: a diverging prediction is caught by the training loop's loss check.
            loss1, loss2 = kernels.chamfer_l2_loss(
                (pred1, pred2), (neigh1.reshape(B * G, M, 3), neigh2.reshape(B * G, M, 3)),
                check=False)
        return {"loss_view1": loss1, "loss_view2": loss2, "loss": loss1 + loss2,
                "neighborhood1": neigh1, "center1": center1, "pred1": pred1.reshape(B, G, M, 3),
                "neighborhood2": neigh2, "center2": center2, "pred2": pred2.reshape(B, G, M, 3)}
