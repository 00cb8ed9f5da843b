"""kernels.linear_patch_max (the patch embedding's last layer and its max over each patch, one
op; --fused-embed): the Triton kernels against the plain-PyTorch reference under the
interpreter (forward, argmax, both gradients, ties, NaN, partial tiles), its check at first
use, the PatchEmbed that uses it against the one that does not, and torch.compile around it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import DEV, ON_GPU
from kernels import reference as R
from pqae.model import PatchEmbed, fuse_embed

triton_ops = pytest.importorskip("kernels.triton_ops")


def _inputs(p, m, k, c, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p * m, k, generator=g).to(dtype)
    w = (torch.randn(c, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    grad = torch.randn(p, c, generator=g).to(dtype)
    return x, w, b, grad


def _on(t):
    return None if t is None else t.to(DEV)


@pytest.fixture
def interpreted():
    if not ON_GPU and not triton_ops._INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")


def _bn(p, k, dtype, seed=1):
    """(add, scale, shift) of the BatchNorm + ReLU prologue, about half the points above 0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(p, k, generator=g).to(dtype), torch.rand(k, generator=g) + 0.5,
            torch.randn(k, generator=g) * 0.5)


# (patches, points per patch, in channels, out channels, bias, dtype, prologue): partial last
# tiles, a group size that is not a power of two, channels that are not multiples of the
# blocks
CASES = [(9, 32, 40, 70, True, torch.float32, False), (5, 20, 16, 24, False, torch.float32, False),
         (3, 64, 24, 150, True, torch.float32, False), (6, 32, 48, 40, True, torch.bfloat16, False),
         (9, 32, 40, 70, True, torch.float32, True), (5, 20, 16, 24, False, torch.float32, True),
         (6, 32, 48, 40, True, torch.bfloat16, True)]


@pytest.mark.parametrize("p,m,k,c,bias,dtype,prologue", CASES)
def test_triton_matches_reference(interpreted, p, m, k, c, bias, dtype, prologue):
    """The kernels against the reference, from the same inputs and the kernel's argmax. In
    float32 elementwise; in bf16 as relative L2 errors, as bf16 rounding can move a point
    across the ReLU (the whole gradient of that value changes)."""
    x, w, b, g = _inputs(p, m, k, c, dtype, bias)
    bn = _bn(p, k, dtype) if prologue else None
    out, idx = triton_ops.patch_max_fwd(_on(x), _on(w), _on(b), m,
                                        None if bn is None else tuple(map(_on, bn)))
    out, idx = out.cpu(), idx.cpu().long()
    assert out.dtype == dtype and out.shape == (p, c) and idx.shape == (p, c)
    want, want_idx = R.patch_max_fwd(x, w, b, m, bn)
    low = dtype != torch.float32

    def close(a, r, what):
        a, r = a.cpu().float(), r.float()
        if low:
            assert ((a - r).norm() / r.norm()).item() < 2e-2, what
            if what in ("max", "grad x"):
                # rounded to bf16 as the GPU does (to nearest even; the interpreter alone
                # truncates): nearly all equal, bit for bit
                assert (a != r).float().mean().item() < 0.05, what
        else:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda s: f"{what}: {s}")

    close(out, want, "max")
    a = x if bn is None else R.bn_relu(x, m, *bn)[1]
    y = F.linear(a.float(), w.float(), None if b is None else b.float()).reshape(p, m, c)
    close(y.gather(1, idx[:, None]).squeeze(1), want, "value at the argmax")  # a max
    assert idx.min() >= 0 and idx.max() < m
    if not low:
        assert (idx == want_idx.long()).float().mean() > 0.99  # (near-ties may differ)
    got = triton_ops.patch_max_bwd(_on(g), _on(idx.to(torch.int16)), _on(x), _on(w), m,
                                   (True, True, bias), None if bn is None else tuple(map(_on, bn)))
    ref = R.patch_max_bwd(g, idx, x, w, m, (True, True, bias), bn)
    assert len(got) == len(ref) == (5 if prologue else 3)
    for name, a, r in zip(("x", "weight", "bias", "add", "scale and shift"), got, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, name
        close(a, r, f"grad {name}")


def test_ties_go_to_the_first_point_and_nan_propagates(interpreted):
    p, m, k, c = 4, 20, 16, 24
    x, w, b, _ = _inputs(p, m, k, c, torch.float32)
    x[m:2 * m] = x[m + 3]  # patch 1: one point repeated, every channel ties
    x[2 * m + 7, 5] = float("nan")  # patch 2: a NaN point
    out, idx = triton_ops.patch_max_fwd(_on(x), _on(w), _on(b), m)
    out, idx = out.cpu(), idx.cpu()
    assert (idx[1] == 0).all()
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()  # as torch.max


def test_one_split_and_many_of_the_weight_gradient(interpreted, monkeypatch):
    """The weight gradient is summed over splits of the patches: the same for 1 and many."""
    x, w, b, g = _inputs(7, 16, 16, 24, torch.float32)
    _, idx = triton_ops.patch_max_fwd(_on(x), _on(w), _on(b), 16)
    dws = []
    for programs in (1, 10_000):
        monkeypatch.setattr(triton_ops, "_PM_PROGRAMS", programs)
        dws.append(triton_ops.patch_max_bwd(_on(g), idx, _on(x), _on(w), 16,
                                            (False, True, False))[1].cpu())
    torch.testing.assert_close(dws[0], dws[1], rtol=1e-6, atol=1e-6)
    want = R.patch_max_bwd(g, idx.cpu().long(), x, w, 16, (False, True, False))[1]
    torch.testing.assert_close(dws[0], want, rtol=1e-5, atol=1e-5)


def test_public_op_equals_linear_then_max_with_gradients():
    """On CPU (the reference path) the op is F.linear + max, values and gradients; with the
    prologue, F.linear of relu((x + add) * scale + shift), the gradients of all six inputs."""
    x = torch.randn(6, 10, 12, requires_grad=True)
    w = torch.randn(20, 12, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = kernels.linear_patch_max(x, w, b)
    r = F.linear(x, w, b).max(dim=1).values
    assert torch.equal(y, r)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(r, (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):
        assert kernels.linear_patch_max(x, w, b).dtype == torch.bfloat16  # as F.linear
    # with the BatchNorm + ReLU prologue: the gradients of add, scale and shift too
    add, scale, shift = (t.requires_grad_() for t in _bn(6, 12, torch.float32))
    args = (x, w, b, add, scale, shift)
    y = kernels.linear_patch_max(x, w, b, add=add, scale=scale, shift=shift)
    r = F.linear(torch.relu((x + add[:, None]) * scale + shift), w, b).max(dim=1).values
    torch.testing.assert_close(y, r, rtol=1e-6, atol=1e-6)
    for a, e in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(r, args, g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(6, 12), torch.zeros(20, 12)), r"x must be a \(P, M, K\) tensor, got shape \(6, 12\)"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 11)), r"weight must have shape \(C, 12\).*\(20, 11\)"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 12), torch.zeros(19)), r"bias must have shape \(20,\)"),
    ((torch.zeros(2, 6, 12, dtype=torch.long), torch.zeros(20, 12)), "x must be a float tensor"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 12), None, torch.zeros(2, 12), torch.zeros(12), None),
     "scale and shift come together"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 12), None, torch.zeros(3, 12), torch.zeros(12),
      torch.zeros(12)), r"add must have shape \(2, 12\) for x of shape \(2, 6, 12\), got \(3, 12\)"),
])
def test_bad_input_raises(args, match):
    x, w, *rest = args
    b, add, scale, shift = rest + [None] * (4 - len(rest))
    with pytest.raises(ValueError, match=match):
        kernels.linear_patch_max(x, w, b, add=add, scale=scale, shift=shift)


def test_check_at_first_use_catches_a_wrong_kernel(fresh, monkeypatch):
    """A kernel that gives wrong gradients fails its check on first use: the op warns and
    uses the reference, which still gives the right answer."""
    from kernels import verify

    bwd = triton_ops.patch_max_bwd

    def wrong(*args):
        dx, dw, db = bwd(*args)
        return dx, dw * 1.01, db

    monkeypatch.setattr(triton_ops, "patch_max_bwd", wrong)
    x = torch.randn(3, 16, 8, device=DEV, requires_grad=True)
    w = torch.randn(12, 8, device=DEV, requires_grad=True)
    with pytest.warns(verify.KernelCheckWarning, match=r"patch_max\[m=16,float32,bias=0"):
        y = kernels.linear_patch_max(x, w)
    y.sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.linear(x2, w2).max(dim=1).values.sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    summary = verify.summary()
    assert summary["fallback"] == ["patch_max"]
    assert [v["ok"] for k, v in summary["variants"].items() if "patch_max" in k] == [False]


def _embeds(seed=0):
    torch.manual_seed(seed)
    plain = PatchEmbed(24, 8)
    fused = fuse_embed(PatchEmbed(24, 8), True)
    fused.load_state_dict(plain.state_dict())
    assert fused.fused and not plain.fused
    return plain, fused


def _fwd_bwd(model, pts):
    y = model(pts)
    grads = torch.autograd.grad(y.float().square().sum(), list(model.parameters()))
    return y, grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("triton", [False, True])
def test_fused_patch_embed_equals_the_plain_one(fresh, triton):
    """PatchEmbed with fused=True against fused=False: forward, parameter gradients and the
    BatchNorms' running statistics over two training steps, then eval mode; on CPU's
    reference path and on the Triton path (interpreted here) to float32 rounding (bn2 in
    affine form rounds differently)."""
    kernels.set_backend("triton" if triton else "reference")
    plain, fused = _embeds()
    plain, fused = plain.to(DEV), fused.to(DEV)
    tol = dict(rtol=1e-5, atol=1e-5)
    for step in range(3):
        if step == 2:
            plain.eval(), fused.eval()
        pts = (torch.randn(10, 24, 3) * (step + 1)).to(DEV)
        (y0, g0, s0), (y1, g1, s1) = _fwd_bwd(plain, pts), _fwd_bwd(fused, pts)
        torch.testing.assert_close(y1, y0, **tol)
        # relative to the whole gradient: in training the biases before a BatchNorm have a
        # gradient of 0 up to rounding
        scale = torch.cat([b.flatten() for b in g0]).norm()
        for a, b in zip(g1, g0):
            assert ((a - b).norm() / scale).item() < 1e-5
        for a, b in zip(s1, s0):  # running means, variances, batches tracked
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert int(fused.bn2.num_batches_tracked) == 2


@pytest.mark.parametrize("triton", [False, True])
def test_fused_patch_embed_under_bf16_autocast(fresh, triton):
    """Under bf16 autocast the fused PatchEmbed is as close to the float32 result as the plain
    one (relative L2 of the output and of the whole gradient; bf16's own error is a few %, and
    the two paths round differently: the fused one computes fc1 and bn1 in float32)."""
    kernels.set_backend("triton" if triton else "reference")
    err = lambda a, b: ((a.detach().float() - b).norm() / b.norm()).item()  # noqa: E731
    flat = lambda g: torch.cat([t.flatten() for t in g])  # noqa: E731
    errs = []
    for seed in range(4):
        plain, fused = _embeds(seed)
        pts = torch.randn(12, 32, 3).to(DEV)
        y32, g32, _ = _fwd_bwd(plain.to(DEV), pts)
        y32, g32 = y32.detach(), flat(g32)
        plain, fused = _embeds(seed)
        with torch.autocast(DEV.type, torch.bfloat16):
            (y0, g0, _), (y1, g1, _) = _fwd_bwd(plain.to(DEV), pts), _fwd_bwd(fused.to(DEV), pts)
        assert y1.dtype == y0.dtype == torch.bfloat16
        errs.append((err(y0, y32), err(y1, y32), err(flat(g0), g32), err(flat(g1), g32)))
    y0, y1, g0, g1 = (sum(e) / len(errs) for e in zip(*errs))  # means over the seeds
    # (one seed's error alone is noisy: a rounding that moves a patch's max to another point
    # moves that point's gradient, and in bf16 such near-ties are common)
    assert y1 < 1e-2 and y1 < 1.25 * y0
    assert max(e[3] for e in errs) < 0.12 and g1 < 1.25 * g0


def test_compile_traces_the_fused_op_in_one_graph():
    """torch.compile sees pqae::patch_max as one op: the fused PatchEmbed compiles without a
    graph break and gives what it gives eagerly, in float32 and under bf16 autocast."""
    import copy

    import torch._dynamo

    _, fused = _embeds(1)
    twin = copy.deepcopy(fused)
    pts = torch.randn(6, 16, 3)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
        for amp in (False, True):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                got, want = _fwd_bwd(compiled, pts), _fwd_bwd(fused, pts)
            assert got[0].dtype == (torch.bfloat16 if amp else torch.float32)
            for a, b in [(got[0], want[0]), *zip(got[1], want[1]), *zip(got[2], want[2])]:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()
