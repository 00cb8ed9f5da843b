"""linear + max over each patch's points as one op: ``kernels.linear_patch_max``.

The patch embedding ends with ``max_m fc4(a)[p, m]``: a (P*M, 512) x (512, C) GEMM whose
(P*M, C) product exists only to be reduced over each patch's M points, and whose backward
scatters the max's gradient into a (P*M, C) tensor of zeros read by two more GEMMs. Here the
forward GEMM takes the max (and its argmax) in its epilogue and the backward GEMMs build that
sparse gradient from the argmax tile by tile (``triton_ops.patch_max_fwd`` / ``_bwd``): neither
(P*M, C) tensor is written. The ops are ``torch.library`` custom ops (``pqae::patch_max`` and
its backward), so ``torch.compile`` traces around them; each picks Triton or the plain-PyTorch
reference at run time as every op of this package does (``kernels/__init__.py``).
"""
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from . import reference


def _run(x: torch.Tensor, w: torch.Tensor, m: int, has_bias: bool, name: str, *args):
    """`name` of triton_ops, once this variant has passed its check here, else of the
    reference (kernels._dispatch)."""
    import kernels

    c, k = w.shape
    return kernels._dispatch(x, lambda: kernels._spec("patch_max", m, x.dtype, has_bias, c, k),
                             lambda: getattr(kernels._triton_ops(), name)(*args),
                             lambda: getattr(reference, name)(*args))


@torch.library.custom_op("pqae::patch_max", mutates_args=())
def patch_max(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
              m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (P*M, K), w (C, K), b (C,) or None, one dtype -> (out (P, C), idx (P, C) int16)."""
    return _run(x, w, m, b is not None, "patch_max_fwd", x, w, b, m)


@patch_max.register_fake
def _(x, w, b, m):
    p, c = x.shape[0] // m, w.shape[0]
    return x.new_empty(p, c), x.new_empty(p, c, dtype=torch.int16)


@torch.library.custom_op("pqae::patch_max_backward", mutates_args=())
def patch_max_backward(g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                       m: int, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (P*M, K), dw (C, K), db (C,)) of patch_max's out given its gradient g (P, C)."""
    return _run(x, w, m, has_bias, "patch_max_bwd", g, idx, x, w, m, (True, True, True))


@patch_max_backward.register_fake
def _(g, idx, x, w, m, has_bias):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0])


def _setup(ctx, inputs, output):
    x, w, b, m = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.m, ctx.has_bias = m, b is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # (no zeros for idx's gradient)


def _backward(ctx, g, _g_idx):
    x, w, idx = ctx.saved_tensors
    if g is None:
        return None, None, None, None
    dx, dw, db = patch_max_backward(g.contiguous(), idx, x, w, ctx.m, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, None


patch_max.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.pqae.patch_max)
def _flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.pqae.patch_max_backward)
def _flops_bwd(g_shape, idx_shape, x_shape, w_shape, *args, **kwargs) -> int:
    return 4 * x_shape[0] * x_shape[1] * w_shape[0]
