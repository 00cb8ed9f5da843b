"""linear + max over each patch's points as one op: ``kernels.linear_patch_max``.

The patch embedding ends with ``max_m fc4(relu(bn2(y)))[p, m]``: a (P*M, 512) x (512, C) GEMM
whose (P*M, C) product exists only to be reduced over each patch's M points, and whose backward
scatters the max's gradient into a (P*M, C) tensor of zeros read by two more GEMMs. Here the
forward GEMM takes the max (and its argmax) in its epilogue and the backward GEMMs build that
sparse gradient from the argmax tile by tile (``triton_ops.patch_max_fwd`` / ``_bwd``): neither
(P*M, C) tensor is written. Optionally the GEMM's input is BatchNorm + ReLU of y = x + add[patch]
in affine form, applied as the tiles are loaded (and its gradients taken in the input
gradient's epilogue), so that neither y nor the ReLU's output is written either.

``kernels.point_mlp_max`` is the embedding's first half: ``fc2(relu(bn1(fc1(x))))`` of the
points x (P*M, 3), the (P*M, C) result and its max over each patch. BatchNorm's statistics come
from x's mean and covariance (``pqae.syncbn.linear_affine``), so the forward GEMM computes fc1
and the BatchNorm on chip from the points as it loads its input tiles, and writes only y and
the max: neither fc1's (P*M, H) output nor the BatchNorm's or the ReLU's is ever written. Its
backward reads y's gradient twice (``triton_ops.point_mlp_bwd``): for fc2's input gradient,
whose product with the recomputed first layer is reduced on chip to the sums that give fc1's,
the BatchNorm's and their gradients, and for fc2's weight gradient.

The ops are ``torch.library`` custom ops (``pqae::patch_max``, ``pqae::point_mlp`` and their
backwards), so
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
    c, k = w.shape
    return _call(x, ("patch_max", m, x.dtype, has_bias, c, k, bn_relu), name, *args)


def _call(x: torch.Tensor, spec: tuple, name: str, *args):
    """(Autocast off: a custom op's body runs under the caller's autocast when eager, not when
    compiled, and its ops compute in the dtypes they are given.)"""
    import kernels

    with kernels.autocast_off(x.device):
        return kernels._dispatch(x, lambda: kernels._spec(*spec),
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


# ----------------------------------------------------------------------------- point_mlp
def _mlp_spec(x: torch.Tensor, w2: torch.Tensor, m: int) -> tuple:
    return ("point_mlp", m, w2.dtype, x.shape[1], w2.shape[1], w2.shape[0])


@torch.library.custom_op("pqae::point_mlp", mutates_args=())
def point_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor,
              shift: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (P*M, K0), w1 (H, K0), b1, scale, shift (H,) float32; w2 (C, H), b2 (C,) of one dtype
    -> (y (P*M, C), out (P, C) of that dtype, idx (P, C) int16) (reference.point_mlp_fwd)."""
    return _call(x, _mlp_spec(x, w2, m), "point_mlp_fwd", x, w1, b1, scale, shift, w2, b2, m)


@point_mlp.register_fake
def _(x, w1, b1, scale, shift, w2, b2, m):
    p, c = x.shape[0] // m, w2.shape[0]
    return (w2.new_empty(x.shape[0], c), w2.new_empty(p, c),
            w2.new_empty(p, c, dtype=torch.int16))


@torch.library.custom_op("pqae::point_mlp_backward", mutates_args=())
def point_mlp_backward(gy: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                       w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, w2: torch.Tensor, m: int) -> list[torch.Tensor]:
    """[dw2b (C*H + C,), sums (2 + K0, H) float32] (reference.point_mlp_bwd)."""
    return list(_call(x, _mlp_spec(x, w2, m), "point_mlp_bwd", gy, g, idx, x, w1, b1, scale,
                      shift, w2, m))


@point_mlp_backward.register_fake
def _(gy, g, idx, x, w1, b1, scale, shift, w2, m):
    c, h = w2.shape
    return [w2.new_empty(c * h + c), scale.new_empty(2 + x.shape[1], h)]


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, scale, shift, w2, b2, m = inputs
    ctx.save_for_backward(x, w1, b1, scale, shift, w2, output[2])
    ctx.m = m
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, gy, g, _g_idx):
    x, w1, b1, scale, shift, w2, idx = ctx.saved_tensors
    if gy is None and g is None:
        return (None,) * 8
    (pm, k0), (c, h) = x.shape, w2.shape
    gy = w2.new_zeros(pm, c) if gy is None else gy.to(w2.dtype).contiguous()
    g = w2.new_zeros(pm // ctx.m, c) if g is None else g.to(w2.dtype).contiguous()
    dw2b, sums = point_mlp_backward(gy, g, idx, x, w1, b1, scale, shift, w2, ctx.m)
    # a = z * scale + shift, z = x w1^T + b1: d shift = sum dz, d scale = sum dz z,
    # d z = dz * scale, so d b1 = scale * sum dz and d w1 = scale * (dz^T x)
    dw1 = sums[2:].t() * scale[:, None]
    return (None, dw1.to(w1.dtype), (sums[0] * scale).to(b1.dtype), sums[1], sums[0],
            dw2b[:c * h].view(c, h), dw2b[c * h:], None)


point_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)


@register_flop_formula(torch.ops.pqae.point_mlp)
def _mlp_flops(x_shape, w1_shape, b1_shape, scale_shape, shift_shape, w2_shape, *args,
               **kwargs) -> int:
    return 2 * x_shape[0] * w1_shape[0] * (x_shape[1] + w2_shape[0])


@register_flop_formula(torch.ops.pqae.point_mlp_backward)
def _mlp_flops_bwd(gy_shape, g_shape, idx_shape, x_shape, w1_shape, b1_shape, scale_shape,
                   shift_shape, w2_shape, *args, **kwargs) -> int:
    # fc2's two gradients and fc1's weight gradient (as the unfused layers' backward)
    return 2 * x_shape[0] * w1_shape[0] * (x_shape[1] + 2 * w2_shape[0])
