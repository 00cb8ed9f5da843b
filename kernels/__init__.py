"""Point-cloud kernels for pqae: FPS, kNN, grouping, Chamfer-L2, and the patch embedding's
layers with their patch max (fc1 + BatchNorm + ReLU + fc2, BatchNorm + ReLU + fc4).

Public API
----------
``fps(xyz, m, *, check=None) -> LongTensor (B, m)``
    Farthest point sampling with pointnet2 CUDA semantics: first index 0,
    running-min squared distance (init 1e10), ties to the lowest index, points with
    squared norm <= 1e-3 never picked after the first.
``knn(query, ref, k, *, check=None) -> LongTensor (B, S, k)``
    k nearest ``ref`` points of each ``query`` by squared Euclidean distance, ordered by
    (distance, index): nearest first, equal distances by the lower index.
``group(xyz, num_group, group_size, *, check=None) -> (neighborhood (B, G, M, 3), center (B, G, 3))``
    Grouping: centers = FPS, neighbours = kNN of the centers, neighbourhood = neighbour - center.
    float32 output.
``group_views(views, num_group, group_size, *, check=None) -> [(neighborhood, center)]``
    ``group`` of several tensors of clouds (the two views of a pretraining step) in one FPS and
    one kNN launch for every two of them; each tensor may have its own point count.
``chamfer_l2(a, b, *, check=None) -> (d_a (P, n), d_b (P, m))``
    Squared distance of each point to its nearest point in the other set (no square root),
    float32, differentiable w.r.t. ``a`` and ``b``.
``chamfer_l2_loss(preds, targets, *, check=None) -> [loss]``
    The CD-L2 loss ``d_pred.mean() + d_target.mean()`` of every (pred (P, n, 3), target
    (P, m, 3)) pair, float32 scalars, differentiable. On the Triton path one launch computes
    the losses and gradients of two pairs (both views of a step); backward only scales them.
``linear_patch_max(x, weight, bias=None) -> (P, C)``
    ``F.linear(x, weight, bias).max(dim=1).values`` of x (P, M, K): the patch embedding's last
    layer and its max over each patch (``--fused-embed``), differentiable, in the autocast
    dtype under autocast. On the Triton path the GEMMs take the max (forward) and build its
    sparse gradient (backward) on chip: neither (P*M, C) tensor is written (``patch_max.py``).

``point_mlp_max(x, w1, b1, w2, b2, *, scale, shift) -> (y (P, M, C), out (P, C))``
    The patch embedding's first half (``--fused-embed``): y = fc2(relu(bn(fc1(x)))) of the
    points x (P, M, K0), the BatchNorm in affine form (``pqae.syncbn.linear_affine``), and
    y's max over each patch. On the Triton path the forward GEMM computes fc1 and the
    BatchNorm from the points on chip, and writes only y and the max (``patch_max.py``).

Inputs may be float32 / bfloat16 / float16 (computed in float32; float64 is computed in
float64 by the reference and in float32 by Triton) and non-contiguous. Bad input raises
``ValueError`` naming the argument and its shape.

Backend switch
--------------
* ``auto`` (default): CUDA tensors (the device types in ``TRITON_DEVICES``) use the Triton
  kernels (``kernels/triton_ops.py``) once their variant has passed its check on this machine
  (``kernels/verify.py``: on first use, cached per machine); a variant that fails its check,
  or whose launch raises, uses the plain-PyTorch reference (``kernels/reference.py``) for the
  rest of the process, with one warning. CPU tensors use the reference.
* ``set_backend("reference" | "triton" | "auto")`` forces a backend for the process.
* Environment variable ``PQAE_KERNELS=reference|triton|auto``, read at every call, is used
  when ``set_backend`` has not forced one (i.e. ``set_backend("auto")`` defers to it).
* ``triton`` checks each variant the same way but raises ``verify.KernelCheckError`` instead
  of falling back.
* ``triton`` on CPU tensors is only allowed under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported); otherwise it raises.

Triton path details (``kernels/triton_ops.py``)
-----------------------------------------------
* FPS: one program per cloud, whole cloud in registers, two tensors of clouds per launch;
  indices bit-identical to the reference (same distance op order, FMA contraction disabled).
  N > 8192 (``triton_ops.FPS_MAX_N``) falls back to the reference.
* kNN: one warp per query; a threshold from each lane's two nearest points, a compaction of
  the points within it and a sort of (distance, index) keys. The same neighbours in the same
  order as the reference, whatever the order of the points. k <= 64
  (``triton_ops.KNN_MAX_K``) runs in Triton, larger k falls back to the reference.
* group / group_views: two launches for every two tensors (FPS writing the centers, kNN
  writing neighbour - center).
* chamfer_l2: forward returns min + argmin in both directions (one launch for sets of <= 64
  points, else one tiled launch per direction); backward is a Triton kernel (deterministic,
  no atomics) via ``triton_ops.ChamferL2`` (torch.autograd.Function).
* chamfer_l2_loss: one launch per two pairs computes loss and gradient (deterministic, no
  atomics) via ``triton_ops.ChamferL2Loss``; sets of more than 64 points use chamfer_l2.

NaN/inf check
-------------
Checking coordinates for NaN/inf costs a host sync on the GPU. It is on by default; skip it
per call with ``check=False`` or globally with ``kernels.CHECK_FINITE = False``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import reference

__all__ = ["fps", "knn", "group", "group_views", "chamfer_l2", "chamfer_l2_loss",
           "linear_patch_max", "point_mlp_max", "set_backend",
           "get_backend", "CHECK_FINITE", "TRITON_DEVICES"]

CHECK_FINITE = True
# Device types whose tensors take the Triton path in "auto" mode. (Tests add "cpu" under the
# Triton interpreter to play a GPU machine.)
TRITON_DEVICES = {"cuda"}
_BACKENDS = ("auto", "reference", "triton")
_forced = "auto"


def set_backend(name: str) -> None:
    """Force the backend: "reference", "triton" or "auto" (auto defers to $PQAE_KERNELS)."""
    global _forced
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _forced = name


def get_backend() -> str:
    """The requested backend ("auto", "reference" or "triton"): set_backend, else $PQAE_KERNELS."""
    if _forced != "auto":
        return _forced
    env = os.environ.get("PQAE_KERNELS", "").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"PQAE_KERNELS must be one of {_BACKENDS}, got {env!r}")
    return env


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _spec(op: str, *shape):
    from . import verify

    return verify.spec(op, *shape)


def _triton_ops():
    from . import triton_ops  # lazy: triton is optional on CPU-only machines

    return triton_ops


def _use_triton(t: torch.Tensor) -> bool:
    be = get_backend()
    if be == "reference":
        return False
    if be == "triton":
        if t.device.type != "cuda" and not _interpret():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got device {t.device}) "
                "unless TRITON_INTERPRET=1")
        return True
    # auto
    if t.device.type not in TRITON_DEVICES:
        return False
    try:
        _triton_ops()
    except ImportError:
        return False
    return True


def _dispatch(t: torch.Tensor, spec_of, triton_call, reference_call):
    """The Triton call when the backend picks Triton for `t` and the variant (`spec_of()`, a
    verify.Spec) has passed its check here; otherwise, and after a failed launch in auto mode,
    the reference call."""
    if _use_triton(t):
        from . import verify

        spec = spec_of()
        forced = get_backend() == "triton"
        if verify.ensure(spec, t.device, forced):
            try:
                return triton_call()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                if forced:
                    raise
                verify.launch_failed(spec, t.device, e)
    return reference_call()


# ----------------------------------------------------------------------------- validation
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_points(name: str, t, check: bool | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a float tensor, got dtype {t.dtype} shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if (CHECK_FINITE if check is None else check) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} of shape {tuple(t.shape)} contains NaN or inf coordinates")


def _check_count(name: str, v, limit: int, limit_name: str, shape) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import operator
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{name} must be an int, got {type(v).__name__}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    if v > limit:
        raise ValueError(f"{name}={v} exceeds {limit_name}={limit} of input shape {tuple(shape)}")


def _check_same_batch(n1, t1, n2, t2) -> None:
    if t1.shape[0] != t2.shape[0]:
        raise ValueError(f"batch sizes differ: {n1} {tuple(t1.shape)} vs {n2} {tuple(t2.shape)}")
    if t1.device != t2.device:
        raise ValueError(f"devices differ: {n1} on {t1.device}, {n2} on {t2.device}")


# ----------------------------------------------------------------------------- public ops
def fps(xyz: torch.Tensor, m: int, *, check: bool | None = None) -> torch.Tensor:
    """Farthest point sampling. xyz (B, N, 3) -> indices (B, m) int64 (see module doc)."""
    _check_points("xyz", xyz, check)
    _check_count("m", m, xyz.shape[1], "N", xyz.shape)
    return _dispatch(xyz, lambda: _spec("fps", xyz.shape[1]),
                     lambda: _triton_ops().fps(xyz, int(m)), lambda: reference.fps(xyz, int(m)))


def knn(query: torch.Tensor, ref: torch.Tensor, k: int, *, check: bool | None = None) -> torch.Tensor:
    """k nearest ref points of each query, nearest first. (B, S, 3), (B, N, 3) -> (B, S, k) int64."""
    _check_points("query", query, check)
    _check_points("ref", ref, check)
    _check_same_batch("query", query, "ref", ref)
    _check_count("k", k, ref.shape[1], "N", ref.shape)
    return _dispatch(query, lambda: _spec("knn", ref.shape[1], int(k)),
                     lambda: _triton_ops().knn(query, ref, int(k)),
                     lambda: reference.knn(query, ref, int(k)))


def group(xyz: torch.Tensor, num_group: int, group_size: int, *, check: bool | None = None):
    """FPS + kNN grouping. xyz (B, N, 3) -> (neighborhood (B, G, M, 3), center (B, G, 3))."""
    _check_points("xyz", xyz, check)
    _check_count("num_group", num_group, xyz.shape[1], "N", xyz.shape)
    _check_count("group_size", group_size, xyz.shape[1], "N", xyz.shape)
    return _dispatch(xyz, lambda: _spec("group", (xyz.shape[1],), int(num_group), int(group_size)),
                     lambda: _triton_ops().group(xyz, int(num_group), int(group_size)),
                     lambda: reference.group(xyz, int(num_group), int(group_size)))


def group_views(views, num_group: int, group_size: int, *, check: bool | None = None):
    """group() of every (B, N_v, 3) tensor in `views` (same B): [(neighborhood, center)]."""
    views = list(views)
    if not views:
        raise ValueError("views must hold at least one (B, N, 3) tensor")
    for i, v in enumerate(views):
        _check_points(f"views[{i}]", v, check)
        _check_same_batch("views[0]", views[0], f"views[{i}]", v)
        _check_count("num_group", num_group, v.shape[1], "N", v.shape)
        _check_count("group_size", group_size, v.shape[1], "N", v.shape)
    return _dispatch(views[0], lambda: _spec("group", tuple(v.shape[1] for v in views),
                                             int(num_group), int(group_size)),
                     lambda: _triton_ops().group_views(views, int(num_group), int(group_size)),
                     lambda: reference.group_views(views, int(num_group), int(group_size)))


def chamfer_l2(a: torch.Tensor, b: torch.Tensor, *, check: bool | None = None):
    """Chamfer-L2 halves. a (P, n, 3), b (P, m, 3) -> (d_a (P, n), d_b (P, m)), differentiable."""
    _check_points("a", a, check)
    _check_points("b", b, check)
    _check_same_batch("a", a, "b", b)
    return _dispatch(a, lambda: _spec("chamfer", a.shape[1], b.shape[1]),
                     lambda: _triton_ops().chamfer_l2(a, b), lambda: reference.chamfer_l2(a, b))


def chamfer_l2_loss(preds, targets, *, check: bool | None = None):
    """CD-L2 loss d_pred.mean() + d_target.mean() of every (pred (P, n, 3), target (P, m, 3))
    pair -> [scalar], differentiable."""
    preds, targets = list(preds), list(targets)
    if not preds or len(preds) != len(targets):
        raise ValueError(f"preds and targets must be non-empty lists of equal length, got "
                         f"{len(preds)} and {len(targets)}")
    for i, (a, b) in enumerate(zip(preds, targets)):
        _check_points(f"preds[{i}]", a, check)
        _check_points(f"targets[{i}]", b, check)
        _check_same_batch(f"preds[{i}]", a, f"targets[{i}]", b)
    a, b = preds[0], targets[0]
    return _dispatch(a, lambda: _spec("chamfer_loss", a.shape[1], b.shape[1], a.dtype, b.dtype,
                                      b.requires_grad and torch.is_grad_enabled()),
                     lambda: _triton_ops().chamfer_l2_loss(preds, targets),
                     lambda: reference.chamfer_l2_loss(preds, targets))


def linear_patch_max(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     *, add: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None):
    """max over each patch's points of a linear layer: x (P, M, K), weight (C, K), bias (C,) ->
    (P, C) = F.linear(x, weight, bias).max(dim=1).values, differentiable (the gradient of tied
    points goes to one of them). With add (P, K), scale (K,) and shift (K,), x is first
    relu((x + add[:, None]) * scale + shift): a BatchNorm in affine form (scale and shift
    from its statistics: pqae.syncbn.affine) and a ReLU, applied on chip on the Triton path.
    Under autocast, computed in its dtype as F.linear is (x + add rounded to it; the affine
    and ReLU in float32)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (P, M, K) tensor, got {_shape_of(x)}")
    p, m, k = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape (C, {k}) for x of shape "
                         f"{tuple(x.shape)}, got {_shape_of(weight)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if (scale is None) != (shift is None) or (add is not None and scale is None):
        raise ValueError("scale and shift come together (add only with them)")
    for name, t, shape in (("add", add, (p, k)), ("scale", scale, (k,)), ("shift", shift, (k,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    _check_floats_on(x=x, weight=weight, bias=bias, add=add, scale=scale, shift=shift)
    if p == 0 or m == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    from . import patch_max

    dtype = _autocast_dtype(x.device, x.dtype)
    x, weight = x.to(dtype).reshape(p * m, k), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale is not None:
        if add is None:
            add = x.new_zeros(p, k)
        f32 = torch.promote_types(dtype, torch.float32)
        add, scale, shift = add.to(dtype), scale.to(f32), shift.to(f32)
    return patch_max.patch_max(x, weight, bias, add, scale, shift, m)[0]


def point_mlp_max(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, *, scale: torch.Tensor, shift: torch.Tensor):
    """Two pointwise layers and the max over each patch: x (P, M, K0), w1 (H, K0), b1, scale,
    shift (H,), w2 (C, H), b2 (C,) -> (y (P, M, C), out (P, C)) with
    y = F.linear(relu(F.linear(x, w1, b1) * scale + shift), w2, b2) and out = y.max(dim=1):
    the patch embedding's fc1, BatchNorm (in affine form: pqae.syncbn.linear_affine), ReLU and
    fc2, and its patch max. Differentiable in every argument but x (the points, which are
    data). The first layer and the affine in float32; under autocast, the ReLU's output, fc2
    and y in autocast's dtype (as F.linear), else in w2's."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (P, M, K0) tensor, got {_shape_of(x)}")
    p, m, k0 = x.shape
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != k0:
        raise ValueError(f"w1 must have shape (H, {k0}) for x of shape {tuple(x.shape)}, got "
                         f"{_shape_of(w1)}")
    h = w1.shape[0]
    if not isinstance(w2, torch.Tensor) or w2.dim() != 2 or w2.shape[1] != h:
        raise ValueError(f"w2 must have shape (C, {h}) for w1 of shape {tuple(w1.shape)}, got "
                         f"{_shape_of(w2)}")
    for name, t, shape in (("b1", b1, (h,)), ("scale", scale, (h,)), ("shift", shift, (h,)),
                           ("b2", b2, (w2.shape[0],))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {_shape_of(t)}")
    _check_floats_on(x=x, w1=w1, b1=b1, w2=w2, b2=b2, scale=scale, shift=shift)
    if p == 0 or m == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("point_mlp_max takes no gradient for x (the points are data); pass "
                         "x.detach()")
    from . import patch_max

    dtype = _autocast_dtype(x.device, w2.dtype)
    f32 = torch.promote_types(x.dtype, torch.float32)
    first = (t.to(f32) for t in (x.reshape(p * m, k0), w1, b1, scale, shift))
    y, out, _ = patch_max.point_mlp(*first, w2.to(dtype), b2.to(dtype), m)
    return y.reshape(p, m, -1), out


_AUTOCAST_DEVICES = ("cuda", "cpu")


def _check_floats_on(**tensors) -> None:
    """Every tensor given (None: absent) is a float tensor on the first one's (x's) device, or
    a ValueError naming it."""
    x = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a float tensor, got dtype {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"devices differ: x on {x.device}, {name} on {t.device}")


def _autocast_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype autocast computes a linear layer in on `device`, or `default` outside it."""
    dev = device.type
    on = dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
    return torch.get_autocast_dtype(dev) if on else default


def autocast_off(device: torch.device):
    """A context without autocast on `device` (a no-op where autocast does not exist, as on
    meta): for code that computes in the dtypes it is given."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _shape_of(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
