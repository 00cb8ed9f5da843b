"""linear + max over each patch's points as one op: ``kernels.linear_patch_max``.

The patch embedding ends with ``max_m fc4(relu(bn2(y)))[p, m]``: a (P*M, 512) x (512, C) GEMM
whose (P*M, C) product exists only to be reduced over each patch's M points, and whose backward
scatters the max's gradient into a (P*M, C) tensor of zeros read by two more GEMMs. Here the
forward GEMM takes the max (and its argmax) in its epilogue and the backward GEMMs build that
sparse gradient from the argmax tile by tile (``triton_ops.patch_max_fwd`` / ``_bwd``): neither
(P*M, C) tensor is written. Optionally the GEMM's input is BatchNorm + ReLU of y = x + add[patch]
in affine form, applied as the tiles are loaded (and its gradients taken in the input
gradient's epilogue), so that neither y nor the ReLU's output is written either.

The ops are ``torch.library`` custom ops (``pqae::patch_max`` and its backward), so
``torch.compile`` traces around them; each picks Triton or the plain-PyTorch reference at run
time as every op of this package does (``kernels/__init__.py``).
"""
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from . import reference


def _run(x: torch.Tensor, w: torch.Tensor, m: int, has_bias: bool, bn_relu: bool, name: str,
         *args):
    """`name` of triton_ops, once this variant has passed its check here, else of the
    reference (kernels._dispatch)."""
    import kernels

    c, k = w.shape
    return kernels._dispatch(
        x, lambda: kernels._spec("patch_max", m, x.dtype, has_bias, c, k, bn_relu),
        lambda: getattr(kernels._triton_ops(), name)(*args),
        lambda: getattr(reference, name)(*args))


def _bn(add, scale, shift):
    return None if scale is None else (add, scale, shift)


@torch.library.custom_op("pqae::patch_max", mutates_args=())
def patch_max(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
              add: Optional[torch.Tensor], scale: Optional[torch.Tensor],
              shift: Optional[torch.Tensor], m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (P*M, K), w (C, K), b (C,) or None, one dtype; add (P, K) of that dtype, scale and
    shift (K,) float32, or None -> (out (P, C), idx (P, C) int16)."""
    bn = _bn(add, scale, shift)
    return _run(x, w, m, b is not None, bn is not None, "patch_max_fwd", x, w, b, m, bn)


@patch_max.register_fake
def _(x, w, b, add, scale, shift, m):
    p, c = x.shape[0] // m, w.shape[0]
    return x.new_empty(p, c), x.new_empty(p, c, dtype=torch.int16)


@torch.library.custom_op("pqae::patch_max_backward", mutates_args=())
def patch_max_backward(g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                       add: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], m: int, has_bias: bool) -> list[torch.Tensor]:
    """[dx (P*M, K), dw (C, K), db (C,)] of patch_max's out given its gradient g (P, C), and
    with the prologue [dadd (P, K), (2, K): scale's and shift's] after them."""
    bn = _bn(add, scale, shift)
    out = _run(x, w, m, has_bias, bn is not None, "patch_max_bwd", g, idx, x, w, m,
               (True, True, True), bn)
    return list(out)


@patch_max_backward.register_fake
def _(g, idx, x, w, add, scale, shift, m, has_bias):
    out = [torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0])]
    if scale is not None:
        out += [torch.empty_like(add), scale.new_empty(2, scale.shape[0])]
    return out


def _setup(ctx, inputs, output):
    x, w, b, add, scale, shift, m = inputs
    ctx.save_for_backward(x, w, output[1], add, scale, shift)
    ctx.m, ctx.has_bias = m, b is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # (no zeros for idx's gradient)


def _backward(ctx, g, _g_idx):
    x, w, idx, add, scale, shift = ctx.saved_tensors
    if g is None:
        return None, None, None, None, None, None, None
    grads = patch_max_backward(g.contiguous(), idx, x, w, add, scale, shift, ctx.m, ctx.has_bias)
    dx, dw, db = grads[:3]
    dadd, dscale, dshift = (grads[3], *grads[4]) if len(grads) > 3 else (None, None, None)
    return dx, dw, db if ctx.has_bias else None, dadd, dscale, dshift, None


patch_max.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.pqae.patch_max)
def _flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.pqae.patch_max_backward)
def _flops_bwd(g_shape, idx_shape, x_shape, w_shape, *args, **kwargs) -> int:
    return 4 * x_shape[0] * x_shape[1] * w_shape[0]
