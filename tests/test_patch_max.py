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


# (patches, points per patch, in channels, out channels, bias, dtype): partial last tiles,
# a group size that is not a power of two, channels that are not multiples of the blocks
CASES = [(9, 32, 40, 70, True, torch.float32), (5, 20, 16, 24, False, torch.float32),
         (3, 64, 24, 150, True, torch.float32), (6, 32, 48, 40, True, torch.bfloat16)]


@pytest.mark.parametrize("p,m,k,c,bias,dtype", CASES)
def test_triton_matches_reference(interpreted, p, m, k, c, bias, dtype):
    x, w, b, g = _inputs(p, m, k, c, dtype, bias)
    out, idx = triton_ops.patch_max_fwd(_on(x), _on(w), _on(b), m)
    out, idx = out.cpu(), idx.cpu().long()
    assert out.dtype == dtype and out.shape == (p, c) and idx.shape == (p, c)
    x32, w32, g32 = x.float(), w.float(), g.float()
    b32 = None if b is None else b.float()
    want, want_idx = R.patch_max_fwd(x32, w32, b32, m)
    low = dtype != torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), want, **tol)
    y = F.linear(x32, w32, b32).reshape(p, m, c)
    torch.testing.assert_close(y.gather(1, idx[:, None]).squeeze(1), want, **tol)  # a max
    assert idx.min() >= 0 and idx.max() < m
    if not low:
        assert (idx == want_idx.long()).float().mean() > 0.99  # (near-ties may differ)
    got = triton_ops.patch_max_bwd(_on(g), _on(idx.to(torch.int16)), _on(x), _on(w), m,
                                   (True, True, bias))
    ref = R.patch_max_bwd(g32, idx, x32, w32, m, (True, True, bias))
    for name, a, r in zip(("x", "weight", "bias"), got, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.cpu().float(), r, **tol, msg=lambda s: f"grad {name}: {s}")


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
    """On CPU (the reference path) the op is F.linear + max, values and gradients."""
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


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(6, 12), torch.zeros(20, 12)), r"x must be a \(P, M, K\) tensor, got shape \(6, 12\)"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 11)), r"weight must have shape \(C, 12\).*\(20, 11\)"),
    ((torch.zeros(2, 6, 12), torch.zeros(20, 12), torch.zeros(19)), r"bias must have shape \(20,\)"),
    ((torch.zeros(2, 6, 12, dtype=torch.long), torch.zeros(20, 12)), "x must be a float tensor"),
])
def test_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.linear_patch_max(*args)


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
    return y, grads, (model.bn1.running_mean.clone(), model.bn2.running_var.clone())


@pytest.mark.parametrize("triton", [False, True])
def test_fused_patch_embed_equals_the_plain_one(fresh, triton):
    """PatchEmbed with fused=True against fused=False: forward, parameter gradients and the
    BatchNorms' running statistics, in training mode; on CPU's reference path bit for bit, on
    the Triton path (interpreted here) to float32 rounding."""
    kernels.set_backend("triton" if triton else "reference")
    plain, fused = _embeds()
    pts = torch.randn(10, 24, 3)
    (y0, g0, s0), (y1, g1, s1) = _fwd_bwd(plain.to(DEV), pts.to(DEV)), _fwd_bwd(fused.to(DEV), pts.to(DEV))
    tol = dict(rtol=1e-5, atol=1e-5) if triton else dict(rtol=0, atol=0)
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_traces_the_fused_op_in_one_graph():
    """torch.compile sees pqae::patch_max as one op: the fused PatchEmbed compiles without a
    graph break and gives what eager gives, in float32 and under bf16 autocast."""
    import torch._dynamo

    plain, fused = _embeds(1)
    pts = torch.randn(6, 16, 3)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
        for amp in (False, True):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                got, want = _fwd_bwd(compiled, pts), _fwd_bwd(plain, pts)
            assert got[0].dtype == (torch.bfloat16 if amp else torch.float32)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            for a, b in zip(got[1], want[1]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()
