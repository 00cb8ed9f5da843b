"""Plain-PyTorch reference implementations (CPU path and test oracle).

Every function here assumes already-validated inputs (see ``kernels/__init__.py``):
float coordinates of shape (..., 3). Low-precision inputs (bf16/fp16) are upcast to
float32; float64 stays float64 (so ``gradcheck`` works on the Chamfer reference).

Squared distances are always computed as ``((dx*dx + dy*dy) + dz*dz)`` with
``d = p - q`` in this exact operation order, never as |a|^2 + |b|^2 - 2ab: the
expansion loses precision (a point's distance to itself is not exactly 0), and the
Triton kernels use the same order so FPS/kNN results match bit for bit.
"""
from __future__ import annotations

import torch

# Squared norm at or below which a point is never picked by FPS after the first pick
# (quirk of the pointnet2 CUDA op).
FPS_ORIGIN_EPS = 1e-3
# Initial running-minimum distance of FPS (pointnet2 uses 1e10).
FPS_INIT_DIST = 1e10
# kNN processes queries in chunks so that the (B, s, N) distance matrix stays below this
# many elements (bounds memory at large N).
_KNN_CHUNK_ELEMS = 1 << 25


def sqdist(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Squared distance between broadcastable point tensors p (..., 3) and q (..., 3).

    Operation order ((dx^2 + dy^2) + dz^2) is fixed on purpose (bitwise parity with Triton).
    """
    d = p - q
    dx, dy, dz = d.unbind(-1)
    return (dx * dx + dy * dy) + dz * dz


def fps(xyz: torch.Tensor, m: int) -> torch.Tensor:
    """Farthest point sampling, pointnet2 CUDA semantics. xyz (B, N, 3) -> idx (B, m) int64.

    First index is 0; each next pick maximises the running-minimum squared distance to the
    picked set; ties go to the lowest index (torch.argmax returns the first maximum);
    points with squared norm <= 1e-3 score -1 and so are never picked after the first
    (if every score is -1, argmax gives index 0, as in the CUDA op). Computed in float32.
    """
    x = xyz.to(torch.float32)  # the CUDA op is float32-only; always compute in float32
    B, N, _ = x.shape
    px, py, pz = x.unbind(-1)  # each (B, N)
    # pointnet2 tests `mag <= 1e-3` with a float32 mag against the double 1e-3. For float32
    # values that is exactly `mag < float32(1e-3)`, since float32(1e-3) > 1e-3.
    near_origin = ((px * px + py * py) + pz * pz) < FPS_ORIGIN_EPS  # (B, N)
    run_min = torch.full((B, N), FPS_INIT_DIST, dtype=x.dtype, device=x.device)
    neg_one = torch.full((), -1.0, dtype=x.dtype, device=x.device)
    idx = torch.zeros((B, m), dtype=torch.long, device=x.device)
    last = torch.zeros((B,), dtype=torch.long, device=x.device)
    ar = torch.arange(B, device=x.device)
    for i in range(1, m):
        c = x[ar, last]  # (B, 3): coordinates of the previous pick
        dx = px - c[:, 0:1]
        dy = py - c[:, 1:2]
        dz = pz - c[:, 2:3]
        d = (dx * dx + dy * dy) + dz * dz  # (B, N)
        run_min = torch.minimum(run_min, d)
        score = torch.where(near_origin, neg_one, run_min)
        last = torch.argmax(score, dim=1)  # first maximal index = lowest-index tie-break
        idx[:, i] = last
    return idx


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """k nearest ref points of each query. query (B, S, 3), ref (B, N, 3) -> (B, S, k) int64,
    ordered by (distance, index): nearest first, and equal distances by the lower index.
    Distances computed exactly as sum of squared differences."""
    dt = torch.float64 if torch.float64 in (query.dtype, ref.dtype) else torch.float32
    q = query.to(dt)
    r = ref.to(dt)
    B, S, _ = q.shape
    N = r.shape[1]
    chunk = max(1, _KNN_CHUNK_ELEMS // max(1, B * N))
    out = []
    for s0 in range(0, S, chunk):
        d = sqdist(q[:, s0:s0 + chunk, None, :], r[:, None, :, :])  # (B, s, N)
        if dt == torch.float32:
            # (distance bits, index) in one int64: the bits of a float32 >= 0 order like its
            # value, so one top-k gives the (distance, index) order (torch.topk alone leaves
            # the order of ties unspecified)
            key = (d.view(torch.int32).to(torch.int64) << 32) | torch.arange(N, device=d.device)
            out.append(torch.topk(key, k, dim=-1, largest=False, sorted=True).values & 0xFFFFFFFF)
        else:
            out.append(torch.sort(d, dim=-1, stable=True).indices[..., :k])
    return torch.cat(out, dim=1)


def gather_points(xyz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """xyz (B, N, C), idx (B, ...) -> (B, ..., C)."""
    B = xyz.shape[0]
    flat = idx.reshape(B, -1)
    g = torch.gather(xyz, 1, flat[..., None].expand(-1, -1, xyz.shape[-1]))
    return g.reshape(*idx.shape, xyz.shape[-1])


def group(xyz: torch.Tensor, num_group: int, group_size: int):
    """FPS + kNN. xyz (B, N, 3) -> (neighborhood (B, G, M, 3), center (B, G, 3)), float32."""
    x = xyz.float()
    center = gather_points(x, fps(x, num_group))  # (B, G, 3)
    nbr_idx = knn(center, x, group_size)  # (B, G, M)
    neighborhood = gather_points(x, nbr_idx) - center[:, :, None, :]
    return neighborhood, center


def group_views(views, num_group: int, group_size: int):
    """group() of every tensor of clouds in `views`."""
    return [group(v, num_group, group_size) for v in views]


def chamfer_l2(a: torch.Tensor, b: torch.Tensor):
    """a (P, n, 3), b (P, m, 3) -> (d_a (P, n), d_b (P, m)): squared distance of each point
    to its nearest point in the other set. Differentiable (autograd through the dense
    (P, n, m) matrix). float32 output (float64 if an input is float64)."""
    dt = torch.float64 if (a.dtype == torch.float64 or b.dtype == torch.float64) else torch.float32
    d = sqdist(a.to(dt)[:, :, None, :], b.to(dt)[:, None, :, :])  # (P, n, m)
    return d.min(dim=2).values, d.min(dim=1).values


def chamfer_l2_loss(preds, targets):
    """[mean d_pred + mean d_target (not halved)] of every (pred (P, n, 3), target (P, m, 3))."""
    return [sum(d.mean() for d in chamfer_l2(a, b)) for a, b in zip(preds, targets)]


def bn_relu(x: torch.Tensor, m: int, add: torch.Tensor, scale: torch.Tensor,
            shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_patch_max's prologue: (y, relu(y * scale + shift)) with y = x + add[patch] in x's
    dtype (as autocast's bf16 sum), the affine and ReLU in float32, the result in x's dtype."""
    p, k = x.shape[0] // m, x.shape[1]
    y = (x.reshape(p, m, k) + add[:, None]).reshape(p * m, k)
    return y, torch.relu(y.float() * scale + shift).to(x.dtype)


def patch_max_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: int,
                  bn: tuple | None = None):
    """x (P*M, K), w (C, K), b (C,) or None -> (out (P, C), idx (P, C) int16): the max over each
    patch's M rows of x w^T + b and the row that holds it (torch.max's). bn = (add (P, K),
    scale (K,), shift (K,)): x is first relu((x + add[patch]) * scale + shift) (bn_relu)."""
    if bn is not None:
        x = bn_relu(x, m, *bn)[1]
    y = torch.nn.functional.linear(x, w, b)
    out, idx = y.reshape(-1, m, y.shape[-1]).max(dim=1)
    return out, idx.to(torch.int16)


def patch_max_bwd(g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  m: int, need: tuple[bool, bool, bool], bn: tuple | None = None):
    """The gradients (dx, dw, db) of patch_max_fwd given out's gradient g (P, C) and idx, as
    autograd computes them for linear + max: the max's gradient scattered to the winning rows,
    then the linear's backward (None for those not in `need`). With bn, dx through the
    prologue, and also add's gradient and (2, K) float32: scale's and shift's."""
    p, c = g.shape
    s = g.new_zeros(p, m, c).scatter_(1, idx.long()[:, None], g[:, None]).reshape(p * m, c)
    y, a = bn_relu(x, m, *bn) if bn is not None else (None, x)
    dx = s.mm(w) if need[0] or bn is not None else None
    dw = s.t().mm(a) if need[1] else None
    db = s.sum(0) if need[2] else None
    if bn is None:
        return dx, dw, db
    add, scale, shift = bn
    yf = y.float()
    dz = dx.float() * (yf * scale + shift > 0)
    dx32 = dz * scale
    dadd = dx32.reshape(p, m, -1).sum(1).to(add.dtype)
    return dx32.to(x.dtype), dw, db, dadd, torch.stack([(dz * yf).sum(0), dz.sum(0)])


def point_mlp_h(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """point_mlp's first layer: (z, a, h) with z = x w1^T + b1 and a = z * scale + shift in
    float32, h = relu(a) in `dtype` (the second layer's)."""
    z = torch.nn.functional.linear(x, w1, b1)
    a = z * scale + shift
    return z, a, torch.relu(a).to(dtype)


def point_mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor,
                  shift: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, m: int):
    """x (P*M, K0), w1 (H, K0), b1, scale, shift (H,), all float32; w2 (C, H), b2 (C,) of the
    output dtype -> (y (P*M, C), out (P, C), idx (P, C) int16): y = relu((x w1^T + b1) * scale
    + shift) w2^T + b2, the first layer and the affine in float32 (point_mlp_h), and y's max
    over each patch's M rows with the row that holds it (torch.max's)."""
    y = torch.nn.functional.linear(point_mlp_h(x, w1, b1, scale, shift, w2.dtype)[2], w2, b2)
    out, idx = y.reshape(-1, m, y.shape[-1]).max(dim=1)
    return y, out, idx.to(torch.int16)


def point_mlp_bwd(gy: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                  w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  w2: torch.Tensor, m: int):
    """point_mlp_fwd's gradients given y's gy (P*M, C) and out's g (P, C), of w2's dtype:
    (dw2b (C*H + C,) of w2's dtype: w2's gradient (C, H) flattened, then b2's; sums (2 + K0, H)
    float32). With G = gy + the max's gradient scattered to the winning rows (added in w2's
    dtype, as autograd adds them), dw2 = G^T h and db2 = G's sum over the rows; with
    dz = (G w2)[a > 0] in float32 (not rounded to w2's dtype: its sums feed BatchNorm's
    backward, whose terms cancel), sums holds the sums over the rows of dz, dz * z and
    dz * x[:, j]: the gradients of shift and scale, and, times scale, those of b1 and w1
    (H, K0) transposed."""
    p, c = g.shape
    s = g.new_zeros(p, m, c).scatter_(1, idx.long()[:, None], g[:, None]).reshape(p * m, c)
    G = gy + s
    z, a, h = point_mlp_h(x, w1, b1, scale, shift, w2.dtype)
    dz = G.float().mm(w2.float()) * (a > 0)  # (bf16 products are exact in float32)
    sums = torch.cat([dz.sum(0)[None], (dz * z).sum(0)[None], x.t().mm(dz)])
    return torch.cat([G.t().mm(h).reshape(-1), G.sum(0)]), sums
