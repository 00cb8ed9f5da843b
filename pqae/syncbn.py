"""BatchNorm over the global batch of all DDP processes, without reading anything on the host.

`torch.nn.SyncBatchNorm` reads its per-rank counts on the host in every forward (a host sync
per BatchNorm layer: four per pretraining step, and a graph break under torch.compile).
`GlobalBatchNorm1d` gathers one small tensor per layer, each rank's (mean, sum of squared
deviations, count) per channel, with a differentiable collective (its backward sums the
ranks' gradients), combines them exactly (Chan et al.'s parallel variance: no cancellation,
whatever the mean), and normalises with the global mean and biased variance: BatchNorm over
the global batch, forward and backward. torch.compile traces it as one graph.

    model = syncbn.convert(model)   # before DDP, like SyncBatchNorm.convert_sync_batchnorm
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

import kernels


# torch 2.13 renamed these (same arguments) and warns on every call of the old names
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """(k,) -> (world, k), every rank's tensor; the gradient of a rank's tensor is the sum of
    the ranks' gradients for its row. (Functional collectives: asynchronous on the device, and
    traceable by torch.compile.)"""

    @staticmethod
    def forward(ctx, t):
        return funcol.wait_tensor(_all_gather(t[None], 0, dist.group.WORLD))

    @staticmethod
    def backward(ctx, g):
        return funcol.wait_tensor(_reduce_scatter(g.contiguous(), "sum", 0, dist.group.WORLD))[0]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics cover every process of the default group.
    Parameters, buffers and state-dict keys are those of nn.BatchNorm1d; in eval mode, or in a
    single process, it is nn.BatchNorm1d."""

    def global_batch(self) -> bool:
        """Whether training statistics come from every process (training, several of them)."""
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.global_batch():
            return super().forward(x)
        if x.dim() not in (2, 3):
            raise ValueError(f"expected (N, C) or (N, C, L) input, got {tuple(x.shape)}")
        C = self.num_features
        dims = (0,) if x.dim() == 2 else (0, 2)
        shape = (1, C) if x.dim() == 2 else (1, C, 1)
        # statistics in float32 (as BatchNorm under autocast), float64 stays float64
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean, var, n = self.global_stats(xf, dims)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            _track(self, mean, var, n / (n - 1).clamp_min(1))
        return y

    def global_stats(self, xf: torch.Tensor, dims: tuple = (0,)):
        """(mean, biased variance, count) per channel of xf over `dims` and every process."""
        C = self.num_features
        var_l, mean_l = torch.var_mean(xf, dim=dims, correction=0)  # this rank's, stable
        n_l = xf.numel() // C
        g = _AllGather.apply(torch.cat([mean_l, var_l * n_l, xf.new_full((1,), n_l)]))
        counts = g[:, 2 * C:]  # (world, 1)
        n = counts.sum()
        mean = (counts * g[:, :C]).sum(0) / n
        var = (g[:, C:2 * C].sum(0) + (counts * (g[:, :C] - mean).square()).sum(0)) / n
        return mean, var, n


def _track(bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, unbias) -> None:
    """BatchNorm's running statistics after a training batch of this mean and biased variance
    (`unbias`: n / (n - 1), the factor to the unbiased variance)."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = (1.0 / bn.num_batches_tracked.float() if bn.momentum is None
             else bn.momentum)  # (a tensor weight: no host read)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var * unbias).to(bn.running_var.dtype), m)


class _VarMean(torch.autograd.Function):
    """torch.var_mean(x, dim=0, correction=0) in float32 (float64 stays float64) of x (N, C),
    keeping x in its own dtype for the backward (not its float32 copy), which uses the saved
    mean: one elementwise pass, dx = (dmean + 2 dvar (x - mean)) / N (torch's recomputes the
    mean, a second pass over x)."""

    @staticmethod
    def forward(ctx, x):
        var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)), dim=0,
                                   correction=0)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, dvar, dmean):
        x, mean = ctx.saved_tensors
        n = x.shape[0]
        dx = 0.0
        if dvar is not None:
            dx = (x - mean) * (dvar * (2.0 / n))
        if dmean is not None:
            dx = dx + dmean / n
        return dx.to(x.dtype)


def affine(bn: nn.BatchNorm1d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift), float32 (float64 for float64), with which `bn`
    normalises x (N, C) in its present mode: bn(x) == x * scale + shift up to rounding. In
    training the batch's statistics (a GlobalBatchNorm1d's under DDP: the global batch's),
    and the running ones updated as bn's forward would; else the running ones. For a kernel
    that applies the BatchNorm itself (kernels.linear_patch_max's prologue)."""
    if bn.training or not bn.track_running_stats:
        if isinstance(bn, GlobalBatchNorm1d) and bn.global_batch():
            mean, var, n = bn.global_stats(x.to(torch.promote_types(x.dtype, torch.float32)))
            unbias = n / (n - 1).clamp_min(1)
        else:
            var, mean = _VarMean.apply(x)
            unbias = x.shape[0] / max(x.shape[0] - 1, 1)
        if bn.training and bn.track_running_stats:
            _track(bn, mean, var, unbias)
    else:
        mean, var = bn.running_mean, bn.running_var
    return _scale_shift(bn, mean, var)


def _scale_shift(bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor):
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
        return scale, bn.bias - mean * scale
    return scale, -mean * scale


def linear_affine(bn: nn.BatchNorm1d, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`affine(bn, F.linear(x, weight, bias))` without the linear layer's output: x (N, K) with
    few features (the points, K = 3), whose mean and covariance give the statistics of
    z = x weight^T + bias exactly (mean_z = weight mean_x + bias, var_z = diag(weight cov_x
    weight^T)): a pass over (N, K) instead of (N, C), and differentiable in weight and bias
    (x is data: no gradient). In training the batch's statistics (under DDP with a
    GlobalBatchNorm1d, the global batch's: the ranks' moments combined as Chan et al.'s),
    float32 (float64 for float64), and the running ones updated as bn's forward would. For
    kernels.point_mlp_max, which computes the linear layer and the BatchNorm on chip."""
    if not (bn.training or not bn.track_running_stats):
        return _scale_shift(bn, bn.running_mean, bn.running_var)
    with kernels.autocast_off(x.device):  # (float32 moments, not bf16 GEMMs)
        return _linear_affine(bn, x, weight, bias)


def _linear_affine(bn, x, weight, bias):
    xf = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    n_l, k = xf.shape
    mean_x = xf.mean(0)
    xc = xf - mean_x
    m2 = xc.t().mm(xc)  # (K, K): sum of outer products of the deviations
    n = xf.new_full((), float(n_l))  # (a fill, not a host copy: CUDA-graph capturable)
    if isinstance(bn, GlobalBatchNorm1d) and bn.global_batch():
        g = _AllGather.apply(torch.cat([mean_x, m2.reshape(-1), n[None]]))
        counts = g[:, -1:]  # (world, 1)
        n = counts.sum()
        mean_x = (counts * g[:, :k]).sum(0) / n
        d = g[:, :k] - mean_x  # (world, K)
        m2 = g[:, k:-1].sum(0).reshape(k, k) + (counts * d).t().mm(d)
    w = weight.to(xf.dtype)
    mean = torch.nn.functional.linear(mean_x, w, bias.to(xf.dtype))
    var = (w.mm(m2 / n) * w).sum(1)
    if bn.training and bn.track_running_stats:
        _track(bn, mean, var, n / (n - 1).clamp_min(1))
    return _scale_shift(bn, mean, var)


def convert(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` by a GlobalBatchNorm1d sharing its parameters
    and buffers (so optimizers built later and checkpoints see the same tensors and keys)."""
    if type(module) is nn.BatchNorm1d:
        new = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                setattr(new, name, getattr(module, name))
        for name, buf in module.named_buffers(recurse=False):
            setattr(new, name, buf)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
