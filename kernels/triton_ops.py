"""Triton kernels for FPS, kNN, grouping and Chamfer-L2 (+ their autograd Functions), and
linear + patch max (its autograd: kernels/patch_max.py's custom op).

Called through ``kernels/__init__.py`` (which validates inputs); tensors may be on CUDA, or on
CPU when ``TRITON_INTERPRET=1``. The kernels read float32 (Chamfer also bf16/fp16) contiguous
(.., 3) coordinates.

Bit-parity with ``kernels/reference.py``: squared distances are computed as
``(dx*dx + dy*dy) + dz*dz`` in both, and the FPS / kNN kernels are launched with
``enable_fp_fusion=False`` so the compiler cannot contract them into FMAs (which would change
rounding and hence FPS picks / kNN order). Chamfer keeps FMA (values only need 1e-5).

Every launch goes through ``_launch``, which ``capture()`` can record instead of running:
``kernels.static`` compiles exactly those launches for sm_80 / sm_90 and costs them. Each
runtime loop or data-dependent branch of a kernel carries a ``# cost: tag`` comment, and the
launch gives the tag's trip count (``trips=``) for that cost model.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from . import reference

# kNN: largest k served by the Triton kernel (its threshold comes from 64 values per query);
# larger k falls back to the reference.
KNN_MAX_K = 64
# FPS: the whole cloud is held in registers by one program (no spill up to here); larger N
# falls back to the reference.
FPS_MAX_N = 8192

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Launch option disabling FMA contraction (ignored by the interpreter, which has no FMA).
_NO_FMA = {} if _INTERPRET else {"enable_fp_fusion": False}
_FMA = {} if _INTERPRET else {"enable_fp_fusion": True}
_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # the key of an empty slot


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter holds a scalar argument as a NumPy array of shape (1,) and turns
    it into an int with int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can
    be converted to Python scalars"), so every `range(.., M)` over a kernel argument fails. Later
    Triton squeezes the array first; do the same where it does not. Interpreter only."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_index", False):
        return

    def patch_squeezing(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_squeezing.squeezes_index = True
    interpreter._patch_lang_tensor = patch_squeezing


if _INTERPRET:
    _fix_interpreter_index()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


class Launch(NamedTuple):
    """One kernel launch as the ops make it: what `kernels.static` compiles and costs."""
    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # positional arguments (tensors and ints)
    meta: dict  # constexprs and launch options (num_warps, enable_fp_fusion)
    trips: dict  # `# cost: tag` of the kernel source -> executions per entry (static model)


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture():
    """Record the launches the ops make instead of running them (inputs may be on the `meta`
    device: nothing is computed). `kernels.static` compiles exactly these."""
    global _captured
    prev, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = prev


def _launch(kernel, grid, *args, trips=None, **meta) -> None:
    if _captured is not None:
        _captured.append(Launch(kernel, tuple(grid), args, meta, dict(trips or {})))
    else:
        kernel[grid](*args, **meta)


def _pairs(n: int):
    """Up to two views per launch (a kernel takes two pointers): [(first view, count, last
    view)] of n views."""
    return [(j, min(2, n - j), min(j + 1, n - 1)) for j in range(0, n, 2)]


# ============================================================================ FPS
@triton.jit
def _argmax_xyz(s1, i1, x1, y1, z1, s2, i2, x2, y2, z2):
    # larger score wins; ties go to the lower index
    take2 = (s2 > s1) | ((s2 == s1) & (i2 < i1))
    return (tl.where(take2, s2, s1), tl.where(take2, i2, i1), tl.where(take2, x2, x1),
            tl.where(take2, y2, y1), tl.where(take2, z2, z1))


@triton.jit(do_not_specialize=["N0", "N1"])
def _fps_kernel(
    x0_ptr, x1_ptr,  # (B, N0, 3), (B, N1, 3) float32 contiguous: two sets of clouds (views)
    idx_ptr,  # (V, B, M) int64 out: picked indices
    ctr_ptr,  # (V, B, M, 3) float32 out: picked coordinates (only if WRITE_CENTER)
    soa_ptr,  # (V, B, 3, BLOCK) float32 out: the cloud as x, y, z planes, +inf past N (WRITE_SOA)
    B, N0, N1, M,
    BLOCK: tl.constexpr,  # next power of two >= max(N0, N1, 32): the cloud lives in registers
    CARRY: tl.constexpr,  # the picked coordinates travel with the argmax (no reload per pick)
    WRITE_CENTER: tl.constexpr,
    WRITE_SOA: tl.constexpr,
):
    # One program per cloud (programs [0, B) take x0, [B, 2B) take x1): the M picks are strictly
    # sequential, so parallelism is over the points of the cloud (vector ops + one argmax
    # reduction per pick).
    pid = tl.program_id(0)
    v1 = pid >= B
    N = tl.where(v1, N1, N0)
    base = tl.where(v1, x1_ptr, x0_ptr) + (pid - tl.where(v1, B, 0)).to(tl.int64) * N * 3
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    px = tl.load(base + offs * 3 + 0, mask=valid, other=0.0)  # (BLOCK,)
    py = tl.load(base + offs * 3 + 1, mask=valid, other=0.0)
    pz = tl.load(base + offs * 3 + 2, mask=valid, other=0.0)
    if WRITE_SOA:  # for the kNN of the grouping: unmasked loads, +inf distances past N
        plane = soa_ptr + pid.to(tl.int64) * (3 * BLOCK) + offs
        tl.store(plane, tl.where(valid, px, float("inf")))
        tl.store(plane + BLOCK, tl.where(valid, py, float("inf")))
        tl.store(plane + 2 * BLOCK, tl.where(valid, pz, float("inf")))
    # pointnet2 compares the float32 squared norm with the double 1e-3; for a float32 value
    # "mag <= 1e-3 (double)" is the same as "mag < float32(1e-3)" (float32(1e-3) > 1e-3).
    # Such points (and the padding) score -1 forever: min(-1, d) = -1 for every d >= 0.
    mag = px * px + py * py + pz * pz
    run = tl.where(valid & (mag >= 1e-3), 1e10, -1.0)  # running min sq. distance to the picks
    out = pid.to(tl.int64) * M
    cx = tl.load(base + 0)  # pick 0 is index 0
    cy = tl.load(base + 1)
    cz = tl.load(base + 2)
    tl.store(idx_ptr + out, tl.zeros((), tl.int64))
    if WRITE_CENTER:
        tl.store(ctr_ptr + out * 3 + 0, cx)
        tl.store(ctr_ptr + out * 3 + 1, cy)
        tl.store(ctr_ptr + out * 3 + 2, cz)
    for i in range(1, M):  # cost: picks
        dx = px - cx
        dy = py - cy
        dz = pz - cz
        run = tl.minimum(run, dx * dx + dy * dy + dz * dz)  # == (dx*dx + dy*dy) + dz*dz
        # argmax, ties to the lowest index (all scores -1 -> index 0, like the CUDA op)
        if CARRY:
            _, last, cx, cy, cz = tl.reduce((run, offs, px, py, pz), 0, _argmax_xyz)
        else:
            last = tl.argmax(run, 0, tie_break_left=True)
            cx = tl.load(base + last * 3 + 0)
            cy = tl.load(base + last * 3 + 1)
            cz = tl.load(base + last * 3 + 2)
        tl.store(idx_ptr + out + i, last.to(tl.int64))
        if WRITE_CENTER:
            tl.store(ctr_ptr + (out + i) * 3 + 0, cx)
            tl.store(ctr_ptr + (out + i) * 3 + 1, cy)
            tl.store(ctr_ptr + (out + i) * 3 + 2, cz)


def _fps_cfg(block: int) -> tuple[int, bool]:
    """(num_warps, carry) per block size, from the static cost model (python -m kernels.bench
    --static): up to 2048 points the coordinates ride along with the argmax (3 more selects
    per point, no dependent load per pick); above, the kernel is bound by instruction issue
    and a reload of the picked point (an L1 hit) is cheaper."""
    if block <= 1024:
        return 4, True
    if block <= 2048:
        return 8, True
    return (8 if block <= 4096 else 16), False


def _fps_block(n: int) -> int:
    return max(32, triton.next_power_of_2(n))


def _fps_views(xs: Sequence[torch.Tensor], m: int, write_center: bool, write_soa: bool = False):
    """FPS of every cloud of every tensor in `xs` (each (B, N_v, 3) float32 contiguous, same
    B), two tensors per launch -> idx (V, B, m) int64, centres (V, B, m, 3) or None, and with
    write_soa the clouds as coordinate planes (V, B, 3, P) padded with +inf (P = _fps_block of
    the largest N) or None."""
    V, B = len(xs), xs[0].shape[0]
    dev = xs[0].device
    block = _fps_block(max(x.shape[1] for x in xs))
    idx = torch.empty((V, B, m), dtype=torch.long, device=dev)
    ctr = torch.empty((V, B, m, 3), dtype=torch.float32, device=dev) if write_center else idx
    soa = torch.empty((V, B, 3, block), dtype=torch.float32, device=dev) if write_soa else ctr
    warps, carry = _fps_cfg(block)
    for j, nv, j1 in _pairs(V):
        x0, x1 = xs[j], xs[j1]
        _launch(_fps_kernel, (nv * B,), x0, x1, idx[j:], ctr[j:], soa[j:], B,
                x0.shape[1], x1.shape[1], m, BLOCK=block, CARRY=carry,
                WRITE_CENTER=write_center, WRITE_SOA=write_soa, num_warps=warps,
                trips={"picks": m - 1}, **_NO_FMA)
    return idx, (ctr if write_center else None), (soa if write_soa else None)


def fps(xyz: torch.Tensor, m: int) -> torch.Tensor:
    """xyz (B, N, 3) -> (B, m) int64, identical to reference.fps."""
    if xyz.shape[1] > FPS_MAX_N:
        return reference.fps(xyz, m)
    return _fps_views([_f32(xyz)], m, False)[0][0]


# ============================================================================ kNN
@triton.jit
def _top2(a1, a2, b1, b2):
    # the two smallest of two (smallest, second smallest) pairs
    return tl.minimum(a1, b1), tl.minimum(tl.maximum(a1, b1), tl.minimum(a2, b2))


@triton.jit
def _knn_dist(plane, c0, qx, qy, qz, P, NJ: tl.constexpr):
    """Squared distances (Q, NJ, 32) from the program's queries (Q,) to the chunk's points
    n = c0 + 32 j + lane, and n (1, NJ, 32). The chunk is loaded once for the Q queries. The
    planes are padded with +inf, so the loads need no mask and the padding's distance is +inf.
    (P is not specialised: with the planes' alignment unknown, the compiler loads one point per
    lane and row instead of vectors, which keeps lane = n mod 32 for what follows.)"""
    n = c0 + tl.arange(0, NJ)[:, None] * 32 + tl.arange(0, 32)[None, :]
    dx = tl.load(plane + n)[None, :, :] - qx[:, None, None]
    dy = tl.load(plane + P + n)[None, :, :] - qy[:, None, None]
    dz = tl.load(plane + 2 * P + n)[None, :, :] - qz[:, None, None]
    return dx * dx + dy * dy + dz * dz, n[None, :, :]  # (dx*dx + dy*dy) + dz*dz, as the reference


@triton.jit
def _knn_key(d, n):
    # (distance bits, index) as one int64: ordered like (distance, index) for distances >= 0
    return (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | n.to(tl.uint32).to(tl.int64)


@triton.jit
def _knn_compact(d, n, T, cnt, scr_row, C: tl.constexpr):
    """Append the indices of the points with d <= T to each query's scratch row (first C slots
    kept; the rest land on slot C - 1, harmless: more than C candidates take the fallback);
    returns the new counts (Q,)."""
    ci = (d <= T[:, None, None]).to(tl.int32)  # (Q, NJ, 32)
    per_lane = tl.sum(ci, axis=1)  # (Q, 32)
    # exclusive position = inclusive prefix - 1 (a candidate counts itself)
    off = cnt[:, None] - 1 + tl.cumsum(per_lane, axis=1) - per_lane
    pos = tl.minimum(tl.cumsum(ci, axis=1) + off[:, None, :], C - 1)
    tl.store(scr_row[:, None, None] + pos, n + tl.zeros_like(ci), mask=ci > 0)
    return cnt + tl.sum(per_lane, axis=1)


@triton.jit
def _knn_emit(key, slot, ok, out_row, nbr_row, plane, qx, qy, qz, P, WRITE_NBR: tl.constexpr):
    i = (key & 0xFFFFFFFF).to(tl.int32)
    tl.store(out_row + slot, i.to(tl.int64), mask=ok)
    if WRITE_NBR:
        # fused grouping: gather the neighbour and express it relative to its query
        o = nbr_row + slot * 3
        tl.store(o + 0, tl.load(plane + i, mask=ok) - qx, mask=ok)
        tl.store(o + 1, tl.load(plane + P + i, mask=ok) - qy, mask=ok)
        tl.store(o + 2, tl.load(plane + 2 * P + i, mask=ok) - qz, mask=ok)


@triton.jit(do_not_specialize=["N0", "N1", "P"])
def _knn_kernel(
    q_ptr,  # (V, B, S, 3) float32 contiguous: queries
    pl_ptr,  # (V, B, 3, P) float32: the points of each cloud as x, y, z planes, +inf past N_v
    idx_ptr,  # (V, B, S, K) int64 out: neighbour indices, nearest first
    nbr_ptr,  # (V, B, S, K, 3) float32 out: neighbour - query (only if WRITE_NBR)
    scr_ptr,  # (V, B, S_Q, C) int32 scratch: candidate indices (S_Q: S rounded up to Q)
    S, B, N0, N1, P,  # points of views 0 and 1; plane length (>= N rounded up to a chunk)
    K: tl.constexpr,  # neighbours (<= 64)
    C: tl.constexpr,  # candidate slots (power of two >= 2 K)
    NJ: tl.constexpr,  # rows of 32 points per chunk held in registers
    Q: tl.constexpr,  # queries per program (of one cloud): each chunk is loaded once for them
    CHUNKED: tl.constexpr,  # N > 32 NJ: two passes over chunks instead of one tile
    WRITE_NBR: tl.constexpr,
):
    # Q queries of one cloud per program, their distances in registers as Q x NJ x 32: lane l
    # holds the points n = l (mod 32). (1) Each lane keeps its two nearest per query; the K-th
    # smallest T of those 64 values bounds the K-th nearest distance from above (K distinct
    # points lie within T). (2) The points with d <= T (typically K to 1.6 K) are compacted into
    # the query's scratch row, their (distance, index) keys (3) sorted, and the first K written.
    # The work does not depend on the order of the points. If more than C points lie within T
    # (many points at exactly the same distance, or an order that crowds the nearest points
    # into a few lanes), an exact K-round extract-min fallback runs instead; no query of the
    # real data slices needs it.
    sq = tl.program_id(0) * Q + tl.arange(0, Q)  # (Q,) the program's queries
    vb = tl.program_id(1)  # view * B + cloud
    live = sq < S
    N = tl.where(vb >= B, N1, N0)
    row = vb.to(tl.int64) * S + sq
    qx = tl.load(q_ptr + row * 3 + 0, mask=live, other=0.0)
    qy = tl.load(q_ptr + row * 3 + 1, mask=live, other=0.0)
    qz = tl.load(q_ptr + row * 3 + 2, mask=live, other=0.0)
    plane = pl_ptr + vb.to(tl.int64) * 3 * P
    INF = float("inf")
    if CHUNKED:
        s1 = tl.full((Q, 32), INF, tl.float32)
        s2 = tl.full((Q, 32), INF, tl.float32)
        for c0 in range(0, N, NJ * 32):  # cost: chunks
            d, n = _knn_dist(plane, c0, qx, qy, qz, P, NJ)
            m1, m2 = tl.reduce((d, tl.full(d.shape, INF, tl.float32)), 1, _top2)
            s1, s2 = _top2(s1, s2, m1, m2)
    else:
        d, n = _knn_dist(plane, 0, qx, qy, qz, P, NJ)
        s1, s2 = tl.reduce((d, tl.full(d.shape, INF, tl.float32)), 1, _top2)
    # The 32 smallest of the 64 values are the pairwise minima of the lanes' nearest (sorted
    # ascending) and second nearest (descending), the 32 largest the maxima: the two halves of
    # a bitonic merge.
    a = tl.sort(s1)
    b = tl.sort(s2, descending=True)
    lane = tl.arange(0, 32)[None, :]
    if K == 32:
        T = tl.max(tl.minimum(a, b), axis=1)
    elif K < 32:
        T = tl.max(tl.where(lane == K - 1, tl.sort(tl.minimum(a, b)), -INF), axis=1)
    else:
        T = tl.max(tl.where(lane == K - 33, tl.sort(tl.maximum(a, b)), -INF), axis=1)
    scr_row = scr_ptr + (vb.to(tl.int64) * tl.cdiv(S, Q) * Q + sq) * C
    if CHUNKED:
        cnt = tl.zeros((Q,), tl.int32)
        for c0 in range(0, N, NJ * 32):  # cost: chunks
            d, n = _knn_dist(plane, c0, qx, qy, qz, P, NJ)
            cnt = _knn_compact(d, n, T, cnt, scr_row, C)
    else:
        cnt = _knn_compact(d, n, T, tl.zeros((Q,), tl.int32), scr_row, C)
    tl.debug_barrier()  # the scratch rows are written and read back by different threads
    slot = tl.arange(0, C)[None, :]
    full = slot < cnt[:, None]
    i = tl.load(scr_row[:, None] + slot, mask=full, other=0)
    dx = tl.load(plane + i, mask=full) - qx[:, None]  # the candidates' distances again, as above
    dy = tl.load(plane + P + i, mask=full) - qy[:, None]
    dz = tl.load(plane + 2 * P + i, mask=full) - qz[:, None]
    keys = tl.sort(tl.where(full, _knn_key(dx * dx + dy * dy + dz * dz, i), _INT64_MAX))
    out_row = idx_ptr + row * K
    nbr_row = nbr_ptr + row * K * 3
    ok = (slot < tl.where(cnt <= C, K, 0)[:, None]) & live[:, None]
    _knn_emit(keys, slot, ok, out_row[:, None], nbr_row[:, None], plane, qx[:, None],
              qy[:, None], qz[:, None], P, WRITE_NBR)
    over = (cnt > C) & live
    if tl.max(over.to(tl.int32)) > 0:  # cost: overflow
        # exact and order-free, but K passes over the points: the k-th pick is the smallest
        # key above the previous pick (for the program's queries that overflowed)
        last = tl.full((Q,), -1, tl.int64)
        for t in range(K):  # cost: rounds
            best = tl.full((Q,), _INT64_MAX, tl.int64)
            for c0 in range(0, N, NJ * 32):  # cost: fallback_chunks
                d, n = _knn_dist(plane, c0, qx, qy, qz, P, NJ)
                key = _knn_key(d, n)
                best = tl.minimum(best, tl.min(tl.min(tl.where(key > last[:, None, None], key,
                                                               _INT64_MAX), axis=2), axis=1))
            _knn_emit(best, t, over, out_row, nbr_row, plane, qx, qy, qz, P, WRITE_NBR)
            last = best


_KNN_Q = 2
"""kNN queries per program (one warp): each chunk of the cloud is loaded once for them, which
halves the loads through L2. Costed by kernels.static on sm_90 (one pretraining view, 1023
points): one query a program 27.8 µs (L2 bytes), 2 queries 18.4 µs (L2 bytes; its scheduler
time 12.6 µs), 4 queries on 1 warp spill registers, 4 on 2 warps 19.1 µs (scheduler)."""


def _knn_cfg(n: int, k: int) -> tuple[int, int, bool]:
    """(NJ, C, chunked): one tile of up to 1024 points in registers, else chunks of 1024 (a
    2048-point tile spills on sm_80)."""
    nj = max(1, triton.next_power_of_2(triton.cdiv(n, 32)))
    c = max(16, 2 * triton.next_power_of_2(k))
    return (nj, c, False) if nj <= 32 else (32, c, True)


def _planes(rs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(V, B, 3, P) coordinate planes of clouds (B, N_v, 3), +inf past N_v (what FPS writes for
    the grouping); P covers the kNN's chunks."""
    n = max(r.shape[1] for r in rs)
    nj, _, chunked = _knn_cfg(n, 1)
    P = triton.cdiv(n, 1024) * 1024 if chunked else nj * 32
    pl = torch.full((len(rs), rs[0].shape[0], 3, P), float("inf"), device=rs[0].device)
    for v, r in enumerate(rs):
        pl[v, :, :, :r.shape[1]] = r.transpose(1, 2)
    return pl


def _knn_views(qs: torch.Tensor, planes: torch.Tensor, ns: Sequence[int], k: int,
               write_nbr: bool):
    """kNN of every view v: queries qs[v] (B, S, 3) among the first ns[v] points of planes[v]
    (B, 3, P), float32 contiguous, two views per launch -> idx (V, B, S, k) int64 and
    neighbour - query (V, B, S, k, 3) or None."""
    V, B, S, _ = qs.shape
    dev = qs.device
    idx = torch.empty((V, B, S, k), dtype=torch.long, device=dev)
    nbr = torch.empty((V, B, S, k, 3), dtype=torch.float32, device=dev) if write_nbr else idx
    for j, nv, j1 in _pairs(V):
        n0, n1 = ns[j], ns[j1]
        nj, c, chunked = _knn_cfg(max(n0, n1), k)
        q = _KNN_Q
        scr = torch.empty((nv, B, triton.cdiv(S, q) * q, c), dtype=torch.int32, device=dev)
        chunks = triton.cdiv(max(n0, n1), nj * 32)
        _launch(_knn_kernel, (triton.cdiv(S, q), nv * B), qs[j:], planes[j:], idx[j:], nbr[j:],
                scr, S, B, n0, n1, planes.shape[-1], K=k, C=c, NJ=nj, Q=q, CHUNKED=chunked,
                WRITE_NBR=write_nbr, num_warps=1,
                trips={"chunks": chunks, "overflow": 0, "rounds": k, "fallback_chunks": chunks},
                **_NO_FMA)
    return idx, (nbr if write_nbr else None)


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """query (B, S, 3), ref (B, N, 3) -> (B, S, k) int64, nearest first (ties: lower index)."""
    if k > KNN_MAX_K:
        return reference.knn(query, ref, k)
    r = _f32(ref)
    return _knn_views(_f32(query)[None], _planes([r]), [r.shape[1]], k, False)[0][0]


def group_views(views: Sequence[torch.Tensor], num_group: int, group_size: int):
    """Grouping of every view in two launches (two views per launch): FPS (writes the centres)
    and kNN (writes neighbour - centre) -> [(neighborhood (B, G, M, 3), center (B, G, 3))]."""
    xs = [_f32(v) for v in views]
    if max(x.shape[1] for x in xs) > FPS_MAX_N or group_size > KNN_MAX_K:
        return [reference.group(x, num_group, group_size) for x in xs]
    _, center, planes = _fps_views(xs, num_group, True, write_soa=True)
    _, nbr = _knn_views(center, planes, [x.shape[1] for x in xs], group_size, True)
    return [(nbr[v], center[v]) for v in range(len(xs))]


def group(xyz: torch.Tensor, num_group: int, group_size: int):
    """FPS + kNN grouping of one tensor of clouds: group_views([xyz], ...)[0]."""
    return group_views([xyz], num_group, group_size)[0]


# ============================================================================ Chamfer
@triton.jit
def _nn_fwd_kernel(
    src_ptr,   # (P, n, 3) float32 contiguous
    dst_ptr,   # (P, m, 3) float32 contiguous
    dist_ptr,  # (P, n) float32 out: min squared distance of each src point to dst
    arg_ptr,   # (P, n) int32 out: index of that nearest dst point (lowest on ties)
    n, m,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (pair, block of BLOCK_S src points); streams dst in BLOCK_D tiles.
    p = tl.program_id(0).to(tl.int64)
    si = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = si < n
    sb = src_ptr + p * n * 3 + si * 3
    sx = tl.load(sb + 0, mask=smask, other=0.0)
    sy = tl.load(sb + 1, mask=smask, other=0.0)
    sz = tl.load(sb + 2, mask=smask, other=0.0)
    best = tl.full((BLOCK_S,), float("inf"), tl.float32)
    barg = tl.zeros((BLOCK_S,), tl.int32)
    dcols = tl.arange(0, BLOCK_D)
    for m0 in range(0, m, BLOCK_D):  # cost: tiles
        dj = m0 + dcols
        dmask = dj < m
        db = dst_ptr + p * m * 3 + dj * 3
        dx = sx[:, None] - tl.load(db + 0, mask=dmask, other=0.0)[None, :]
        dy = sy[:, None] - tl.load(db + 1, mask=dmask, other=0.0)[None, :]
        dz = sz[:, None] - tl.load(db + 2, mask=dmask, other=0.0)[None, :]
        d = dx * dx + dy * dy + dz * dz  # (BS, BD)
        d = tl.where(dmask[None, :], d, float("inf"))
        tmin = tl.min(d, axis=1)
        targ = tl.argmin(d, axis=1, tie_break_left=True) + m0
        upd = tmin < best  # strict: earlier (lower-index) tile wins ties
        barg = tl.where(upd, targ.to(tl.int32), barg)
        best = tl.where(upd, tmin, best)
    tl.store(dist_ptr + p * n + si, best, mask=smask)
    tl.store(arg_ptr + p * n + si, barg, mask=smask)


@triton.jit
def _nn_fwd_pair_kernel(
    a_ptr, b_ptr,  # (P, n, 3), (P, m, 3) float32 contiguous
    da_ptr, aa_ptr,  # (P, n) float32 / int32 out: nearest-b distance and index per a point
    db_ptr, ab_ptr,  # (P, m) float32 / int32 out: nearest-a distance and index per b point
    n, m,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # >= n, >= m: the whole pair in one tile
):
    # Small sets (the training case, 32 vs 32): one program per pair computes the full (n, m)
    # distance tile once and reduces it along both axes, so both directions cost one sweep.
    p = tl.program_id(0).to(tl.int64)
    ia = tl.arange(0, BLOCK_A)
    ib = tl.arange(0, BLOCK_B)
    am = ia < n
    bm = ib < m
    ab = a_ptr + p * n * 3 + ia * 3
    bb = b_ptr + p * m * 3 + ib * 3
    dx = tl.load(ab + 0, mask=am, other=0.0)[:, None] - tl.load(bb + 0, mask=bm, other=0.0)[None, :]
    dy = tl.load(ab + 1, mask=am, other=0.0)[:, None] - tl.load(bb + 1, mask=bm, other=0.0)[None, :]
    dz = tl.load(ab + 2, mask=am, other=0.0)[:, None] - tl.load(bb + 2, mask=bm, other=0.0)[None, :]
    d = dx * dx + dy * dy + dz * dz  # (BA, BB)
    d = tl.where(am[:, None] & bm[None, :], d, float("inf"))
    tl.store(da_ptr + p * n + ia, tl.min(d, axis=1), mask=am)
    tl.store(aa_ptr + p * n + ia, tl.argmin(d, axis=1, tie_break_left=True).to(tl.int32), mask=am)
    tl.store(db_ptr + p * m + ib, tl.min(d, axis=0), mask=bm)
    tl.store(ab_ptr + p * m + ib, tl.argmin(d, axis=0, tie_break_left=True).to(tl.int32), mask=bm)


@triton.jit
def _nn_bwd_kernel(
    src_ptr,    # (P, n, 3) float32: the set whose gradient we compute
    dst_ptr,    # (P, m, 3) float32: the other set
    gs_ptr,     # (P, n) float32: grad of d_src
    as_ptr,     # (P, n) int32: nearest dst of each src point
    gd_ptr,     # (P, m) float32: grad of d_dst
    ad_ptr,     # (P, m) int32: nearest src of each dst point
    out_ptr,    # (P, n, 3) float32 out: grad w.r.t. src
    n, m,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_src[i] = 2 g_s[i] (s_i - t_{as[i]})  +  sum_{j : ad[j] == i} 2 g_d[j] (s_i - t_j)
    # The second (scatter) term is gathered instead of scattered: each program scans the dst
    # points of its pair and keeps those whose nearest src is in its block. No atomics, so the
    # result is deterministic; the cost is one more O(n m) sweep, like the forward.
    p = tl.program_id(0).to(tl.int64)
    si = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = si < n
    sb = src_ptr + p * n * 3 + si * 3
    sx = tl.load(sb + 0, mask=smask, other=0.0)
    sy = tl.load(sb + 1, mask=smask, other=0.0)
    sz = tl.load(sb + 2, mask=smask, other=0.0)
    g = 2.0 * tl.load(gs_ptr + p * n + si, mask=smask, other=0.0)
    a = tl.load(as_ptr + p * n + si, mask=smask, other=0).to(tl.int64)
    tb = dst_ptr + p * m * 3 + a * 3
    gx = g * (sx - tl.load(tb + 0, mask=smask, other=0.0))
    gy = g * (sy - tl.load(tb + 1, mask=smask, other=0.0))
    gz = g * (sz - tl.load(tb + 2, mask=smask, other=0.0))
    dcols = tl.arange(0, BLOCK_D)
    for m0 in range(0, m, BLOCK_D):  # cost: tiles
        dj = m0 + dcols
        dmask = dj < m
        db = dst_ptr + p * m * 3 + dj * 3
        tx = tl.load(db + 0, mask=dmask, other=0.0)
        ty = tl.load(db + 1, mask=dmask, other=0.0)
        tz = tl.load(db + 2, mask=dmask, other=0.0)
        gd = 2.0 * tl.load(gd_ptr + p * m + dj, mask=dmask, other=0.0)
        ad = tl.load(ad_ptr + p * m + dj, mask=dmask, other=-1)
        w = tl.where(ad[None, :] == si[:, None], gd[None, :], 0.0)  # (BS, BD)
        gx += tl.sum(w * (sx[:, None] - tx[None, :]), axis=1)
        gy += tl.sum(w * (sy[:, None] - ty[None, :]), axis=1)
        gz += tl.sum(w * (sz[:, None] - tz[None, :]), axis=1)
    ob = out_ptr + p * n * 3 + si * 3
    tl.store(ob + 0, gx, mask=smask)
    tl.store(ob + 1, gy, mask=smask)
    tl.store(ob + 2, gz, mask=smask)


# Sets with at most this many points on both sides use the single-tile pair kernel.
_CD_PAIR_MAX = 64


def _cd_blocks(n: int, m: int):
    bs = min(64, max(16, triton.next_power_of_2(n)))
    bd = min(64, max(16, triton.next_power_of_2(m)))
    return bs, bd, (8 if bs * bd >= 4096 else 4)


def _nn_fwd_both(a, b):
    """Both directions: (d_a, arg_a, d_b, arg_b)."""
    P, n, _ = a.shape
    m = b.shape[1]
    if n > _CD_PAIR_MAX or m > _CD_PAIR_MAX:
        return (*_nn_fwd(a, b), *_nn_fwd(b, a))
    d_a = torch.empty((P, n), dtype=torch.float32, device=a.device)
    d_b = torch.empty((P, m), dtype=torch.float32, device=a.device)
    arg_a = torch.empty((P, n), dtype=torch.int32, device=a.device)
    arg_b = torch.empty((P, m), dtype=torch.int32, device=a.device)
    ba = max(16, triton.next_power_of_2(n))
    bb = max(16, triton.next_power_of_2(m))
    _launch(_nn_fwd_pair_kernel, (P,), a, b, d_a, arg_a, d_b, arg_b, n, m, BLOCK_A=ba,
            BLOCK_B=bb, num_warps=8 if ba * bb >= 4096 else 4, **_FMA)
    return d_a, arg_a, d_b, arg_b


def _nn_fwd(src, dst):
    P, n, _ = src.shape
    m = dst.shape[1]
    dist = torch.empty((P, n), dtype=torch.float32, device=src.device)
    arg = torch.empty((P, n), dtype=torch.int32, device=src.device)
    bs, bd, nw = _cd_blocks(n, m)
    _launch(_nn_fwd_kernel, (P, triton.cdiv(n, bs)), src, dst, dist, arg, n, m,
            BLOCK_S=bs, BLOCK_D=bd, num_warps=nw, trips={"tiles": triton.cdiv(m, bd)}, **_FMA)
    return dist, arg


def _nn_bwd(src, dst, g_src, a_src, g_dst, a_dst):
    P, n, _ = src.shape
    m = dst.shape[1]
    out = torch.empty_like(src)
    bs, bd, nw = _cd_blocks(n, m)
    _launch(_nn_bwd_kernel, (P, triton.cdiv(n, bs)), src, dst, g_src, a_src, g_dst, a_dst, out,
            n, m, BLOCK_S=bs, BLOCK_D=bd, num_warps=nw, trips={"tiles": triton.cdiv(m, bd)},
            **_FMA)
    return out


class ChamferL2(torch.autograd.Function):
    """(a (P, n, 3), b (P, m, 3)) -> (d_a (P, n), d_b (P, m)) with a Triton backward."""

    @staticmethod
    def forward(ctx, a, b):
        a32, b32 = _f32(a), _f32(b)
        # d_a/arg_a: nearest b of each a point; d_b/arg_b: nearest a of each b point
        d_a, arg_a, d_b, arg_b = _nn_fwd_both(a32, b32)
        ctx.save_for_backward(a32, b32, arg_a, arg_b)
        ctx.dtypes = (a.dtype, b.dtype)
        ctx.mark_non_differentiable(arg_a, arg_b)
        return d_a, d_b

    @staticmethod
    def backward(ctx, g_a, g_b):
        a32, b32, arg_a, arg_b = ctx.saved_tensors
        g_a = torch.zeros_like(arg_a, dtype=torch.float32) if g_a is None else _f32(g_a)
        g_b = torch.zeros_like(arg_b, dtype=torch.float32) if g_b is None else _f32(g_b)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _nn_bwd(a32, b32, g_a, arg_a, g_b, arg_b).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _nn_bwd(b32, a32, g_b, arg_b, g_a, arg_a).to(ctx.dtypes[1])
        return grad_a, grad_b


def chamfer_l2(a: torch.Tensor, b: torch.Tensor):
    """a (P, n, 3), b (P, m, 3) -> (d_a (P, n), d_b (P, m)) float32, differentiable."""
    return ChamferL2.apply(a, b)


# ============================================================================ Chamfer loss
@triton.jit
def _cd_loss_kernel(
    a0_ptr, b0_ptr, a1_ptr, b1_ptr,  # (P0, n, 3) / (P0, m, 3) and (P1, n, 3) / (P1, m, 3): two views
    ga0_ptr, ga1_ptr,  # (P_v, n, 3) float32 out: d loss_v / d a_v
    gb0_ptr, gb1_ptr,  # (P_v, m, 3) float32 out: d loss_v / d b_v (only if WRITE_GB)
    part_ptr,  # (P0 + P1,) float32 out: each pair's share of its view's loss
    P0, sa0, sb0, sa1, sb1,  # pairs of view 0; 1/(P_v n) and 1/(P_v m): the mean weights
    n: tl.constexpr, m: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
    WRITE_GB: tl.constexpr,
):
    # One warp per pair (programs [0, P0) view 0, then view 1); everything of the pair stays in
    # registers. The loss of a view is mean_i min_j |a_i - b_j|^2 + mean_j min_i |a_i - b_j|^2;
    # its gradient is computed here too (for an upstream gradient of 1, scaled in backward), so
    # forward and backward of both views are this one launch. The two directions use two tiles,
    # [i, j] reduced over i and [j, i] reduced over j, so that both reductions stay within a
    # thread. The scatter of the second term (every b_j pulls on its nearest a) is gathered per
    # a_i over j, in a fixed order: no atomics, deterministic.
    pid = tl.program_id(0)
    v1 = pid >= P0
    p = (pid - tl.where(v1, P0, 0)).to(tl.int64)
    a_ptr = tl.where(v1, a1_ptr, a0_ptr) + p * (n * 3)
    b_ptr = tl.where(v1, b1_ptr, b0_ptr) + p * (m * 3)
    sa = tl.where(v1, sa1, sa0)
    sb = tl.where(v1, sb1, sb0)
    ia = tl.arange(0, BA)
    ib = tl.arange(0, BB)
    am = ia < n
    bm = ib < m
    ax = tl.load(a_ptr + ia * 3 + 0, mask=am, other=0.0).to(tl.float32)
    ay = tl.load(a_ptr + ia * 3 + 1, mask=am, other=0.0).to(tl.float32)
    az = tl.load(a_ptr + ia * 3 + 2, mask=am, other=0.0).to(tl.float32)
    bx = tl.load(b_ptr + ib * 3 + 0, mask=bm, other=0.0).to(tl.float32)
    by = tl.load(b_ptr + ib * 3 + 1, mask=bm, other=0.0).to(tl.float32)
    bz = tl.load(b_ptr + ib * 3 + 2, mask=bm, other=0.0).to(tl.float32)
    # tile [i, j] = a_i - b_j, reduced over i: the nearest a of each b
    ex = ax[:, None] - bx[None, :]
    ey = ay[:, None] - by[None, :]
    ez = az[:, None] - bz[None, :]
    d1 = tl.where(am[:, None], ex * ex + ey * ey + ez * ez, float("inf"))
    db = tl.min(d1, axis=0)
    arg_b = tl.argmin(d1, axis=0, tie_break_left=True)  # (BB,)
    # tile [j, i] = b_j - a_i (the same distances), reduced over j: the nearest b of each a
    fx = bx[:, None] - ax[None, :]
    fy = by[:, None] - ay[None, :]
    fz = bz[:, None] - az[None, :]
    d2 = tl.where(bm[:, None], fx * fx + fy * fy + fz * fz, float("inf"))
    da = tl.min(d2, axis=0)
    arg_a = tl.argmin(d2, axis=0, tie_break_left=True)  # (BA,)
    part = tl.sum(tl.where(am, da, 0.0)) * sa + tl.sum(tl.where(bm, db, 0.0)) * sb
    tl.store(part_ptr + pid, part)
    # d/d a_i = 2 sa (a_i - b_{arg_a[i]}) + 2 sb sum_{j: arg_b[j] = i} (a_i - b_j)
    hit = (arg_b[:, None] == ia[None, :]) & bm[:, None]  # (BB, BA): b_j's nearest a is a_i
    _cd_grad(tl.where(v1, ga1_ptr, ga0_ptr) + p * (n * 3) + ia * 3, ax, ay, az, am,
             b_ptr + arg_a * 3, hit, fx, fy, fz, sa, sb)
    if WRITE_GB:  # the same for b_j, with the roles swapped (tile [i, j] = a_i - b_j)
        hit = (arg_a[:, None] == ib[None, :]) & am[:, None]  # (BA, BB)
        _cd_grad(tl.where(v1, gb1_ptr, gb0_ptr) + p * (m * 3) + ib * 3, bx, by, bz, bm,
                 a_ptr + arg_b * 3, hit, ex, ey, ez, sb, sa)


@triton.jit
def _cd_grad(g_ptr, x, y, z, ok, near_ptr, hit, tx, ty, tz, s_own, s_other):
    """Store d loss / d p for the points p = (x, y, z) of one set: 2 s_own (p - its nearest
    point of the other set, at near_ptr) + 2 s_other sum over the other set's points o that
    have p as their nearest (hit[o, p]) of (p - o); t = o - p as tiles [o, p]."""
    w = tl.where(hit, 1.0, 0.0)
    tl.store(g_ptr + 0, 2 * s_own * (x - tl.load(near_ptr + 0, mask=ok, other=0.0).to(tl.float32))
             - 2 * s_other * tl.sum(w * tx, axis=0), mask=ok)
    tl.store(g_ptr + 1, 2 * s_own * (y - tl.load(near_ptr + 1, mask=ok, other=0.0).to(tl.float32))
             - 2 * s_other * tl.sum(w * ty, axis=0), mask=ok)
    tl.store(g_ptr + 2, 2 * s_own * (z - tl.load(near_ptr + 2, mask=ok, other=0.0).to(tl.float32))
             - 2 * s_other * tl.sum(w * tz, axis=0), mask=ok)


# Sets of at most this many points use the fused loss kernel (the pair lives in registers).
CD_LOSS_MAX = 32


class ChamferL2Loss(torch.autograd.Function):
    """(a0, b0, a1, b1) -> (loss0, loss1): mean_i d_a + mean_j d_b of each view (a1/b1 may
    repeat a0/b0 with P1 = 0 for a single view). One launch computes both views' losses and
    their gradients; backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, a0, b0, a1, b1, P1):
        P0, n, _ = a0.shape
        m = b0.shape[1]
        gb = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        dev = a0.device
        ga = torch.empty((P0 + P1, n, 3), dtype=torch.float32, device=dev)
        gbt = torch.empty((P0 + P1, m, 3), dtype=torch.float32, device=dev) if gb else ga
        part = torch.empty(P0 + P1, dtype=torch.float32, device=dev)
        ba, bb = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))
        s = [1.0 / (max(1, P) * k) for P in (P0, P1) for k in (n, m)]
        _launch(_cd_loss_kernel, (P0 + P1,), a0, b0, a1, b1, ga, ga[P0:], gbt, gbt[P0:], part,
                P0, *s, n=n, m=m, BA=ba, BB=bb, WRITE_GB=gb, num_warps=2 if gb else 1, **_FMA)
        ctx.save_for_backward(ga, gbt if gb else None)
        ctx.P0, ctx.P1, ctx.dtypes = P0, P1, (a0.dtype, b0.dtype, a1.dtype, b1.dtype)
        return part[:P0].sum(), part[P0:].sum()

    @staticmethod
    def backward(ctx, g0, g1):
        ga, gb = ctx.saved_tensors
        P0 = ctx.P0
        out = [None] * 5
        for k, (g, sl) in enumerate(((g0, slice(0, P0)), (g1, slice(P0, None)))):
            if k == 1 and not ctx.P1:  # a single view: a1/b1 only repeat a0/b0
                break
            if ctx.needs_input_grad[2 * k]:
                out[2 * k] = (ga[sl] * g).to(ctx.dtypes[2 * k])
            if ctx.needs_input_grad[2 * k + 1]:
                out[2 * k + 1] = (gb[sl] * g).to(ctx.dtypes[2 * k + 1])
        return tuple(out)


def chamfer_l2_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]):
    """[mean d_pred + mean d_target] of every (pred (P, n, 3), target (P, m, 3)) pair, two
    pairs per launch (forward and gradient together); larger sets than CD_LOSS_MAX go through
    chamfer_l2."""
    out = []
    for i in range(0, len(preds), 2):
        a, b = preds[i:i + 2], targets[i:i + 2]
        if max(max(t.shape[1] for t in a), max(t.shape[1] for t in b)) > CD_LOSS_MAX or (
                len(a) == 2 and (a[0].shape[1:] != a[1].shape[1:] or b[0].shape[1:] != b[1].shape[1:])):
            out += [sum(d.mean() for d in chamfer_l2(x, y)) for x, y in zip(a, b)]
            continue
        a = [t.contiguous() for t in a]
        b = [t.contiguous() for t in b]
        if len(a) == 1:
            out.append(ChamferL2Loss.apply(a[0], b[0], a[0], b[0], 0)[0])
        else:
            out += list(ChamferL2Loss.apply(a[0], b[0], a[1], b[1], a[1].shape[0]))
    return out


# ============================================================================ linear + patch max
# The patch embedding's last layer and its max over each patch's points, y = max_m (x W^T + b),
# as one GEMM whose epilogue takes the max (and its argmax) over the rows of each patch: the
# (P*M, C) product is never written. Its backward builds the max's sparse gradient (one point
# of each patch and channel, from the argmax) inside the two GEMMs that consume it, so the
# scattered (P*M, C) gradient is never written either. A tile holds whole patches: PB patches
# of MP rows (M rounded up to a power of two; the padding rows are masked).
PATCH_MAX_M = 256  # largest group size served by the Triton path (one patch fits a tile)
_PM_ROWS = 128  # rows (PB * MP) of a tile of the forward and of the input gradient
_PM_DW_ROWS = 64  # rows a step of the weight gradient's reduction covers
_PM_PROGRAMS = 264  # programs the weight gradient's split over patches aims at (2 per SM)


@triton.jit
def _pm_dot(a, b, acc, UP: tl.constexpr):
    """acc + a b in float32. UP (the interpreter, whose dot multiplies bf16's raw bits): the
    operands upcast first, the same products (a bf16 product is exact in float32)."""
    if UP:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _narrow(x, dtype: tl.constexpr, UP: tl.constexpr):
    """float32 x as `dtype`, rounded to nearest even. UP (the interpreter, which truncates to
    bf16): the rounding done on the bits first, so that it narrows as the GPU does."""
    if UP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _pm_rows(tile, P, M: tl.constexpr, MP: tl.constexpr, PB: tl.constexpr):
    """The rows of a tile of PB whole patches: their global row index, whether it is real, and
    their patch."""
    r = tl.arange(0, PB * MP)
    patch = tile * PB + r // MP
    m = r % MP
    return patch.to(tl.int64) * M + m, (m < M) & (patch < P), patch.to(tl.int64)


@triton.jit
def _pm_program(N, BN: tl.constexpr):
    """This program's tile and its BN columns of N: the programs of one tile are adjacent
    (a 1-D grid of tiles x column blocks), so that their reads of the tile's rows meet in L2."""
    blocks = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    return pid // blocks, (pid % blocks) * BN + tl.arange(0, BN)


@triton.jit
def _pm_bn_relu(a, add_ptr, scale_ptr, shift_ptr, patch, k, ok, K, UP: tl.constexpr):
    """The prologue on a tile a (rows, k) of x: y = a + add[patch] rounded to a's dtype (as
    autocast's bf16 sum), then (y in float32, relu(y * scale + shift) in a's dtype)."""
    add = tl.load(add_ptr + patch[:, None] * K + k[None, :], mask=ok, other=0.0)
    y = _narrow(a.to(tl.float32) + add.to(tl.float32), a.dtype, UP).to(tl.float32)
    z = y * tl.load(scale_ptr + k, mask=k < K, other=0.0)[None, :] \
        + tl.load(shift_ptr + k, mask=k < K, other=0.0)[None, :]
    return y, _narrow(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), a.dtype, UP)


@triton.jit
def _pm_sparse_grad(g_ptr, idx_ptr, tile, c, P, C, M: tl.constexpr, MP: tl.constexpr,
                    PB: tl.constexpr, BC: tl.constexpr, TRANS: tl.constexpr):
    """The max's gradient over a tile's rows and the channels c: g[p, c] at the row of patch p
    that won (idx[p, c]), 0 elsewhere; (PB * MP, BC), or (BC, PB * MP) with TRANS."""
    p = tile * PB + tl.arange(0, PB)
    m = tl.arange(0, MP)
    ok = (p < P)[:, None] & (c < C)[None, :]
    off = p.to(tl.int64)[:, None] * C + c[None, :]
    g = tl.load(g_ptr + off, mask=ok, other=0.0)
    win = tl.load(idx_ptr + off, mask=ok, other=-1).to(tl.int32)
    if TRANS:  # (one return: a constexpr branch's return must have the other's type)
        s = tl.where(tl.trans(win)[:, :, None] == m[None, None, :], tl.trans(g)[:, :, None], 0.0)
        s = tl.reshape(s, (BC, PB * MP))
    else:
        s = tl.where(win[:, None, :] == m[None, :, None], g[:, None, :], 0.0)
        s = tl.reshape(s, (PB * MP, BC))
    return s


@triton.jit
def _patch_max_fwd_kernel(x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, out_ptr, idx_ptr,
                          P, K, C, M: tl.constexpr, MP: tl.constexpr, PB: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BN_RELU: tl.constexpr, UP: tl.constexpr):
    # x (P*M, K), w (C, K), b (C,) -> out (P, C) = max over each patch's M rows of x w^T + b,
    # idx (P, C) int16: the first row reaching it (NaN: out is NaN). BN_RELU: x is first
    # relu((x + add[patch]) * scale + shift) (_pm_bn_relu)
    tile, n = _pm_program(C, BN)
    row, row_ok, patch = _pm_rows(tile, P, M, MP, PB)
    acc = tl.zeros((PB * MP, BN), tl.float32)
    for k0 in range(0, K, BK):  # cost: k
        k = k0 + tl.arange(0, BK)
        ok = row_ok[:, None] & (k < K)[None, :]
        a = tl.load(x_ptr + row[:, None] * K + k[None, :], mask=ok, other=0.0)
        if BN_RELU:
            a = _pm_bn_relu(a, add_ptr, scale_ptr, shift_ptr, patch, k, ok, K, UP)[1]
        b = tl.load(w_ptr + n[None, :] * K + k[:, None],
                    mask=(k < K)[:, None] & (n < C)[None, :], other=0.0)
        acc = _pm_dot(a, b, acc, UP)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < C, other=0.0).to(tl.float32)[None, :]
    _pm_store_max(acc, row_ok, tile, n, out_ptr, idx_ptr, P, C, M, MP, PB, BN, UP)


@triton.jit
def _pm_store_max(acc, row_ok, tile, n, out_ptr, idx_ptr, P, C, M: tl.constexpr,
                  MP: tl.constexpr, PB: tl.constexpr, BN: tl.constexpr, UP: tl.constexpr):
    """The max over each patch's rows of a tile's (PB * MP, BN) float32 values (NaN if any is
    NaN, as torch.max) to out[patch, n], and its first row to idx (int16)."""
    v = tl.reshape(tl.where(row_ok[:, None], acc, float("-inf")), (PB, MP, BN))
    top, win = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
    nan = tl.max((v != v).to(tl.int32), axis=1) > 0  # torch.max propagates NaN
    top = tl.where(nan, float("nan"), top)
    win = tl.minimum(win, M - 1)  # (a patch whose every value is -inf: a real row)
    p = tile * PB + tl.arange(0, PB)
    off = p.to(tl.int64)[:, None] * C + n[None, :]
    ok = (p < P)[:, None] & (n < C)[None, :]
    tl.store(out_ptr + off, _narrow(top, out_ptr.dtype.element_ty, UP), mask=ok)
    tl.store(idx_ptr + off, win.to(tl.int16), mask=ok)


@triton.jit
def _patch_max_dx_kernel(g_ptr, idx_ptr, w_ptr, dx_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr,
                         dadd_ptr, part_ptr, P, K, C, M: tl.constexpr, MP: tl.constexpr,
                         PB: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                         BN_RELU: tl.constexpr, UP: tl.constexpr):
    # dx (P*M, K) = S w, S (P*M, C) the max's sparse gradient (built per tile, never stored).
    # BN_RELU: through the prologue, dz = (S w) [y * scale + shift > 0] (S w rounded to x's
    # dtype, as the GEMM's output), dx = dz * scale, dadd (P, K) its sum over each patch, and
    # this tile's sums of dz * y and dz (part (2, tiles, K)): scale's and shift's gradients
    tile, n = _pm_program(K, BN)
    row, row_ok, patch = _pm_rows(tile, P, M, MP, PB)
    acc = tl.zeros((PB * MP, BN), tl.float32)
    for c0 in range(0, C, BC):  # cost: c
        c = c0 + tl.arange(0, BC)
        s = _pm_sparse_grad(g_ptr, idx_ptr, tile, c, P, C, M, MP, PB, BC, False)
        w = tl.load(w_ptr + c[:, None] * K + n[None, :], mask=(c < C)[:, None] & (n < K)[None, :],
                    other=0.0)
        acc = _pm_dot(s.to(w.dtype), w, acc, UP)
    ok = row_ok[:, None] & (n < K)[None, :]
    if BN_RELU:
        xv = tl.load(x_ptr + row[:, None] * K + n[None, :], mask=ok, other=0.0)
        y, a = _pm_bn_relu(xv, add_ptr, scale_ptr, shift_ptr, patch, n, ok, K, UP)
        dz = tl.where(a > 0, _narrow(acc, dx_ptr.dtype.element_ty, UP).to(tl.float32), 0.0)
        acc = dz * tl.load(scale_ptr + n, mask=n < K, other=0.0)[None, :]
        p = tile * PB + tl.arange(0, PB)
        dadd = tl.sum(tl.reshape(acc, (PB, MP, BN)), axis=1)
        tl.store(dadd_ptr + p.to(tl.int64)[:, None] * K + n[None, :],
                 _narrow(dadd, dadd_ptr.dtype.element_ty, UP),
                 mask=(p < P)[:, None] & (n < K)[None, :])
        tiles = tl.num_programs(0) // tl.cdiv(K, BN)
        tl.store(part_ptr + tile * K + n, tl.sum(dz * y, axis=0), mask=n < K)
        tl.store(part_ptr + (tiles + tile) * K + n, tl.sum(dz, axis=0), mask=n < K)
    tl.store(dx_ptr + row[:, None] * K + n[None, :], _narrow(acc, dx_ptr.dtype.element_ty, UP),
             mask=ok)


@triton.jit
def _patch_max_dw_kernel(g_ptr, idx_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr,
                         P, K, C, TILES, M: tl.constexpr, MP: tl.constexpr, PB: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, BN_RELU: tl.constexpr,
                         UP: tl.constexpr):
    # part[s] (C, K) = S^T x over the TILES patch tiles of split s (summed by the caller:
    # deterministic, no atomics); BN_RELU: x through the prologue, recomputed
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    split = tl.program_id(2)
    acc = tl.zeros((BC, BK), tl.float32)
    for tile in range(split * TILES, (split + 1) * TILES):  # cost: tiles
        row, row_ok, patch = _pm_rows(tile, P, M, MP, PB)
        ok = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + row[:, None] * K + k[None, :], mask=ok, other=0.0)
        if BN_RELU:
            x = _pm_bn_relu(x, add_ptr, scale_ptr, shift_ptr, patch, k, ok, K, UP)[1]
        s = _pm_sparse_grad(g_ptr, idx_ptr, tile, c, P, C, M, MP, PB, BC, True)
        acc = _pm_dot(s.to(x.dtype), x, acc, UP)
    off = split.to(tl.int64) * C * K + c[:, None] * K + k[None, :]
    tl.store(part_ptr + off, acc, mask=(c < C)[:, None] & (k < K)[None, :])


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, S, N, BLOCK: tl.constexpr, UP: tl.constexpr):
    # out (N,) = the sum of part (S, N) over S, in float32, stored in out's dtype
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, S):  # cost: parts
        acc += tl.load(part_ptr + s * N + i, mask=i < N, other=0.0)
    tl.store(out_ptr + i, _narrow(acc, out_ptr.dtype.element_ty, UP), mask=i < N)


def _pm_tile(m: int, rows: int) -> tuple[int, int]:
    """(MP, PB): a patch's rows rounded up to a power of two, and the patches of a tile."""
    mp = max(16, triton.next_power_of_2(m))
    return mp, max(1, rows // mp)


def patch_max_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: int,
                  bn: tuple | None = None):
    """x (P*M, K), w (C, K), b (C,) or None, all of x's dtype -> (out (P, C) of x's dtype,
    idx (P, C) int16). bn = (add (P, K) of x's dtype, scale (K,), shift (K,) float32): x is
    first relu((x + add[patch]) * scale + shift). Groups of more than PATCH_MAX_M points use
    the reference."""
    if m > PATCH_MAX_M:
        return reference.patch_max_fwd(x, w, b, m, bn)
    x, w = x.contiguous(), w.contiguous()
    (pm, k), c = x.shape, w.shape[0]
    p = pm // m
    mp, pb = _pm_tile(m, _PM_ROWS)
    bn_ = min(128, max(16, triton.next_power_of_2(c)))
    add, scale, shift = (t.contiguous() for t in bn) if bn is not None else (x, x, x)
    out = torch.empty(p, c, device=x.device, dtype=x.dtype)
    idx = torch.empty(p, c, device=x.device, dtype=torch.int16)
    _launch(_patch_max_fwd_kernel, (triton.cdiv(p, pb) * triton.cdiv(c, bn_),), x, w,
            x if b is None else b.contiguous(), add, scale, shift, out, idx, p, k, c, M=m, MP=mp,
            PB=pb, BN=bn_, BK=32, HAS_BIAS=b is not None, BN_RELU=bn is not None, UP=_INTERPRET,
            num_warps=8, num_stages=3, trips={"k": triton.cdiv(k, 32)})
    return out, idx


def patch_max_bwd(g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  m: int, need: tuple[bool, bool, bool], bn: tuple | None = None):
    """The gradients (dx (P*M, K), dw (C, K), db (C,)) of patch_max_fwd's out, given its
    gradient g (P, C) and idx; those not in `need` are None. With bn, through the prologue,
    and also dadd (P, K) and (2, K) float32: the gradients of scale and shift."""
    if m > PATCH_MAX_M:
        return reference.patch_max_bwd(g, idx, x, w, m, need, bn)
    g, x, w = g.to(x.dtype).contiguous(), x.contiguous(), w.contiguous()
    (pm, k), c = x.shape, w.shape[0]
    p = pm // m
    add, scale, shift = (t.contiguous() for t in bn) if bn is not None else (x, x, x)
    dx = dw = db = dadd = part = None
    if need[0] or bn is not None:
        mp, pb = _pm_tile(m, _PM_ROWS)
        # (the prologue's epilogue holds four more tiles: 128 columns spill on Triton 3.6)
        bn_ = min(128 if bn is None else 64, max(16, triton.next_power_of_2(k)))
        tiles = triton.cdiv(p, pb)
        dx = torch.empty_like(x)
        if bn is not None:
            dadd = torch.empty_like(add)
            part = torch.empty(2, tiles, k, device=x.device, dtype=torch.float32)
        _launch(_patch_max_dx_kernel, (tiles * triton.cdiv(k, bn_),), g, idx, w, dx, x, add, scale,
                shift, dx if dadd is None else dadd, dx if part is None else part, p, k, c, M=m,
                MP=mp, PB=pb, BN=bn_, BC=32, BN_RELU=bn is not None, UP=_INTERPRET, num_warps=8,
                num_stages=3, trips={"c": triton.cdiv(c, 32)})
    if need[1]:
        mp, pb = _pm_tile(m, _PM_DW_ROWS)
        bc = min(64, max(16, triton.next_power_of_2(c)))
        bk = min(128 if x.element_size() == 2 else 32, max(16, triton.next_power_of_2(k)))
        tiles = triton.cdiv(p, pb)
        blocks = triton.cdiv(c, bc) * triton.cdiv(k, bk)
        per = triton.cdiv(tiles, max(1, min(tiles, _PM_PROGRAMS // blocks)))
        splits = triton.cdiv(tiles, per)
        parts = torch.empty(splits, c, k, device=x.device, dtype=torch.float32)
        _launch(_patch_max_dw_kernel, (triton.cdiv(c, bc), triton.cdiv(k, bk), splits), g, idx,
                x, add, scale, shift, parts, p, k, c, per, M=m, MP=mp, PB=pb, BC=bc, BK=bk,
                BN_RELU=bn is not None, UP=_INTERPRET, num_warps=4, num_stages=3,
                trips={"tiles": per})
        dw = torch.empty_like(w)
        _launch(_sum_parts_kernel, (triton.cdiv(c * k, 1024),), parts, dw, splits, c * k,
                BLOCK=1024, UP=_INTERPRET, num_warps=4, trips={"parts": splits})
    if need[2]:
        db = g.sum(0, dtype=w.dtype)
    if bn is None:
        return dx, dw, db
    return dx, dw, db, dadd, part.sum(1)


# ----------------------------------------------------------------------------- point_mlp
# The patch embedding's first half: y = relu((x w1^T + b1) * scale + shift) w2^T + b2 of the
# points x (P*M, K0), and y's max over each patch. The first layer (K0 = 3) and the affine
# are a few FMAs per element: every kernel recomputes h = relu(...) from x for the tile it
# needs instead of reading it, so neither fc1's output nor h is ever written or read.
_MLP_ROWS = 128  # rows (whole patches) of a tile of the forward and of the input gradient
_MLP_DW_ROWS = 64  # rows a step of the weight gradient's reduction covers


@triton.jit
def _mlp_h(x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, row, row_ok, k, H, K0: tl.constexpr,
           dtype: tl.constexpr, UP: tl.constexpr):
    """The first layer on a tile's rows and the columns k of h: (z, a) in float32 and
    h = relu(a) in `dtype` (reference.point_mlp_h)."""
    kok = k < H
    z = tl.zeros((row.shape[0], k.shape[0]), tl.float32) \
        + tl.load(b1_ptr + k, mask=kok, other=0.0)[None, :]
    for j in tl.static_range(K0):
        xj = tl.load(x_ptr + row * K0 + j, mask=row_ok, other=0.0)
        z += xj[:, None] * tl.load(w1_ptr + k * K0 + j, mask=kok, other=0.0)[None, :]
    a = z * tl.load(scale_ptr + k, mask=kok, other=0.0)[None, :] \
        + tl.load(shift_ptr + k, mask=kok, other=0.0)[None, :]
    return z, a, _narrow(tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL), dtype, UP)


@triton.jit
def _mlp_grad(gy_ptr, g_ptr, idx_ptr, tile, row, row_ok, c, P, C, M: tl.constexpr,
              MP: tl.constexpr, PB: tl.constexpr, BC: tl.constexpr, TRANS: tl.constexpr,
              UP: tl.constexpr):
    """y's whole gradient on a tile's rows and the channels c: gy + the max's gradient at the
    winning rows, added in gy's dtype (as autograd adds them); (rows, BC), or (BC, rows) with
    TRANS."""
    s = _pm_sparse_grad(g_ptr, idx_ptr, tile, c, P, C, M, MP, PB, BC, TRANS)
    if TRANS:
        off, ok = row[None, :] * C + c[:, None], row_ok[None, :] & (c < C)[:, None]
    else:
        off, ok = row[:, None] * C + c[None, :], row_ok[:, None] & (c < C)[None, :]
    gy = tl.load(gy_ptr + off, mask=ok, other=0.0)
    return _narrow(gy.to(tl.float32) + s.to(tl.float32), gy.dtype, UP)


@triton.jit
def _mlp_fwd_kernel(x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, w2_ptr, b2_ptr, y_ptr, out_ptr,
                    idx_ptr, P, H, C, K0: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                    PB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UP: tl.constexpr):
    # y (P*M, C) = h w2^T + b2, h = relu((x w1^T + b1) * scale + shift) made per tile from x;
    # out, idx (P, C): y's max over each patch and its first row
    tile, n = _pm_program(C, BN)
    row, row_ok, _ = _pm_rows(tile, P, M, MP, PB)
    acc = tl.zeros((PB * MP, BN), tl.float32)
    for k0 in range(0, H, BK):  # cost: h
        k = k0 + tl.arange(0, BK)
        h = _mlp_h(x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, row, row_ok, k, H, K0,
                   w2_ptr.dtype.element_ty, UP)[2]
        w = tl.load(w2_ptr + n[None, :] * H + k[:, None],
                    mask=(k < H)[:, None] & (n < C)[None, :], other=0.0)
        acc = _pm_dot(h, w, acc, UP)
    acc += tl.load(b2_ptr + n, mask=n < C, other=0.0).to(tl.float32)[None, :]
    y = _narrow(acc, y_ptr.dtype.element_ty, UP)
    tl.store(y_ptr + row[:, None] * C + n[None, :], y, mask=row_ok[:, None] & (n < C)[None, :])
    # the max of y as stored (rounded), as the reference takes it
    _pm_store_max(y.to(tl.float32), row_ok, tile, n, out_ptr, idx_ptr, P, C, M, MP, PB, BN, UP)


@triton.jit
def _mlp_dh_kernel(gy_ptr, g_ptr, idx_ptr, x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, w2_ptr,
                   part_ptr, P, H, C, K0: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                   PB: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, UP: tl.constexpr):
    # dz = (G w2)[a > 0] on a tile (G: y's whole gradient, built per tile; G w2 in float32),
    # reduced at once over the tile's rows to part[tile] (2 + K0, H): the sums of dz, dz * z
    # and dz * x[:, j]. Nothing per row is written
    tile, n = _pm_program(H, BN)
    row, row_ok, _ = _pm_rows(tile, P, M, MP, PB)
    acc = tl.zeros((PB * MP, BN), tl.float32)
    for c0 in range(0, C, BC):  # cost: c
        c = c0 + tl.arange(0, BC)
        G = _mlp_grad(gy_ptr, g_ptr, idx_ptr, tile, row, row_ok, c, P, C, M, MP, PB, BC, False,
                      UP)
        w = tl.load(w2_ptr + c[:, None] * H + n[None, :],
                    mask=(c < C)[:, None] & (n < H)[None, :], other=0.0)
        acc = _pm_dot(G, w, acc, UP)
    z, a, _ = _mlp_h(x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, row, row_ok, n, H, K0,
                     w2_ptr.dtype.element_ty, UP)
    dz = tl.where(a > 0, acc, 0.0)
    out = part_ptr + tile.to(tl.int64) * (2 + K0) * H + n
    tl.store(out, tl.sum(dz, axis=0), mask=n < H)
    tl.store(out + H, tl.sum(dz * z, axis=0), mask=n < H)
    for j in tl.static_range(K0):
        xj = tl.load(x_ptr + row * K0 + j, mask=row_ok, other=0.0)
        tl.store(out + (2 + j) * H, tl.sum(dz * xj[:, None], axis=0), mask=n < H)


@triton.jit
def _mlp_dw_kernel(gy_ptr, g_ptr, idx_ptr, x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr,
                   part_ptr, P, H, C, TILES, K0: tl.constexpr, M: tl.constexpr,
                   MP: tl.constexpr, PB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                   UP: tl.constexpr):
    # part[s] (C*H + C) = [G^T h, G's sum over the rows] over the TILES patch tiles of split s
    # (summed by the caller: deterministic, no atomics); h recomputed from x
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    split = tl.program_id(2)
    acc = tl.zeros((BC, BK), tl.float32)
    colsum = tl.zeros((BC,), tl.float32)
    for tile in range(split * TILES, (split + 1) * TILES):  # cost: tiles
        row, row_ok, _ = _pm_rows(tile, P, M, MP, PB)
        G = _mlp_grad(gy_ptr, g_ptr, idx_ptr, tile, row, row_ok, c, P, C, M, MP, PB, BC, True,
                      UP)
        h = _mlp_h(x_ptr, w1_ptr, b1_ptr, scale_ptr, shift_ptr, row, row_ok, k, H, K0,
                   G.dtype, UP)[2]
        acc = _pm_dot(G, h, acc, UP)
        colsum += tl.sum(G.to(tl.float32), axis=1)
    out = part_ptr + split.to(tl.int64) * (C * H + C)
    tl.store(out + c[:, None] * H + k[None, :], acc, mask=(c < C)[:, None] & (k < H)[None, :])
    if tl.program_id(1) == 0:
        tl.store(out + C * H + c, colsum, mask=c < C)


def point_mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor,
                  shift: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, m: int):
    """reference.point_mlp_fwd: (y (P*M, C), out (P, C) of w2's dtype, idx (P, C) int16).
    Groups of more than PATCH_MAX_M points use the reference."""
    if m > PATCH_MAX_M:
        return reference.point_mlp_fwd(x, w1, b1, scale, shift, w2, b2, m)
    x, w1, b1, scale, shift, w2, b2 = (t.contiguous() for t in (x, w1, b1, scale, shift, w2, b2))
    (pm, k0), (c, h) = x.shape, w2.shape
    p = pm // m
    mp, pb = _pm_tile(m, _MLP_ROWS)
    # (float32's operand tiles take twice the registers: bf16's blocks spill there)
    low = w2.element_size() == 2
    bn = min(128 if low else 64, max(16, triton.next_power_of_2(c)))
    bk = min(64 if low else 32, max(16, triton.next_power_of_2(h)))
    y = torch.empty(pm, c, device=x.device, dtype=w2.dtype)
    out = torch.empty(p, c, device=x.device, dtype=w2.dtype)
    idx = torch.empty(p, c, device=x.device, dtype=torch.int16)
    _launch(_mlp_fwd_kernel, (triton.cdiv(p, pb) * triton.cdiv(c, bn),), x, w1, b1, scale, shift,
            w2, b2, y, out, idx, p, h, c, K0=k0, M=m, MP=mp, PB=pb, BN=bn, BK=bk, UP=_INTERPRET,
            num_warps=8, num_stages=3, trips={"h": triton.cdiv(h, bk)})
    return y, out, idx


def point_mlp_bwd(gy: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                  w1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  w2: torch.Tensor, m: int):
    """reference.point_mlp_bwd: (dw2b (C*H + C,) of w2's dtype, sums (2 + K0, H) float32), in
    four launches: the input gradient's GEMM reduced per tile, fc2's weight gradient split over
    patches, and the sums of each one's parts (the first by torch: one column per program
    would read all tiles' parts alone)."""
    if m > PATCH_MAX_M:
        return reference.point_mlp_bwd(gy, g, idx, x, w1, b1, scale, shift, w2, m)
    gy, g = gy.to(w2.dtype).contiguous(), g.to(w2.dtype).contiguous()
    x, w1, b1, scale, shift, w2 = (t.contiguous() for t in (x, w1, b1, scale, shift, w2))
    (pm, k0), (c, h) = x.shape, w2.shape
    p = pm // m
    mp, pb = _pm_tile(m, _MLP_ROWS)
    bn = min(64, max(16, triton.next_power_of_2(h)))
    tiles = triton.cdiv(p, pb)
    part = torch.empty(tiles, (2 + k0) * h, device=x.device, dtype=torch.float32)
    _launch(_mlp_dh_kernel, (tiles * triton.cdiv(h, bn),), gy, g, idx, x, w1, b1, scale, shift, w2,
            part, p, h, c, K0=k0, M=m, MP=mp, PB=pb, BN=bn, BC=32, UP=_INTERPRET, num_warps=8,
            num_stages=3, trips={"c": triton.cdiv(c, 32)})
    sums = part.sum(0).view(2 + k0, h)  # (few columns, many rows: torch's split reduction)
    mp, pb = _pm_tile(m, _MLP_DW_ROWS)
    low = w2.element_size() == 2
    bc = min(64 if low else 32, max(16, triton.next_power_of_2(c)))
    bk = min(128 if low else 32, max(16, triton.next_power_of_2(h)))
    tiles = triton.cdiv(p, pb)
    blocks = triton.cdiv(c, bc) * triton.cdiv(h, bk)
    per = triton.cdiv(tiles, max(1, min(tiles, _PM_PROGRAMS // blocks)))
    splits = triton.cdiv(tiles, per)
    parts = torch.empty(splits, c * h + c, device=x.device, dtype=torch.float32)
    _launch(_mlp_dw_kernel, (triton.cdiv(c, bc), triton.cdiv(h, bk), splits), gy, g, idx, x, w1,
            b1, scale, shift, parts, p, h, c, per, K0=k0, M=m, MP=mp, PB=pb, BC=bc, BK=bk,
            UP=_INTERPRET, num_warps=4, num_stages=3, trips={"tiles": per})
    dw2b = torch.empty(c * h + c, device=x.device, dtype=w2.dtype)
    _launch(_sum_parts_kernel, (triton.cdiv(c * h + c, 256),), parts, dw2b, splits, c * h + c,
            BLOCK=256, UP=_INTERPRET, num_warps=4, trips={"parts": splits})
    return dw2b, sums
