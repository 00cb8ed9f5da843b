"""kernels.point_mlp_max (the patch embedding's fc1, BatchNorm, ReLU, fc2 and patch max, one
op; --fused-embed): the Triton kernels against the plain-PyTorch reference under the
interpreter (y, the max and its argmax, fc2's gradients and the first layer's sums; ties, NaN,
partial tiles), the public op against the layers it replaces, bad input, and its check at
first use."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import DEV, ON_GPU
from kernels import reference as R

triton_ops = pytest.importorskip("kernels.triton_ops")


@pytest.fixture
def interpreted():
    if not ON_GPU and not triton_ops._INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")


def _inputs(p, m, h, c, dtype, seed=0):
    """(x, w1, b1, scale, shift) float32, w2, b2 of dtype, y's and out's gradients: about half
    of the first layer's outputs above 0."""
    g = torch.Generator().manual_seed(seed)
    first = (torch.randn(p * m, 3, generator=g), torch.randn(h, 3, generator=g),
             torch.randn(h, generator=g) * 0.3, torch.rand(h, generator=g) + 0.5,
             torch.randn(h, generator=g) * 0.3)
    w2 = (torch.randn(c, h, generator=g) * h ** -0.5).to(dtype)
    b2 = torch.randn(c, generator=g).to(dtype)
    gy = torch.randn(p * m, c, generator=g).to(dtype)
    gout = torch.randn(p, c, generator=g).to(dtype)
    return first, w2, b2, gy, gout


def _on(ts):
    return [t.to(DEV) for t in ts]


# (patches, points per patch, hidden, out channels, dtype): partial last tiles, a group size
# that is not a power of two, widths that are not multiples of the blocks, the recipe's widths
CASES = [(9, 32, 40, 70, torch.float32), (5, 20, 16, 24, torch.float32),
         (3, 64, 24, 150, torch.float32), (6, 32, 48, 40, torch.bfloat16),
         (5, 32, 128, 256, torch.bfloat16)]


@pytest.mark.parametrize("p,m,h,c,dtype", CASES)
def test_triton_matches_reference(interpreted, p, m, h, c, dtype):
    """From the same inputs: y and the max (float32 elementwise; bf16 rounded as the GPU
    rounds: nearly all bit for bit), the argmax holds the max, and the gradients (fc2's weight
    and bias, and the first layer's sums) from the kernel's argmax."""
    first, w2, b2, gy, gout = _inputs(p, m, h, c, dtype)
    y, out, idx = (t.cpu() for t in triton_ops.point_mlp_fwd(*_on(first), *_on((w2, b2)), m))
    want_y, want, want_idx = R.point_mlp_fwd(*first, w2, b2, m)
    assert y.dtype == out.dtype == dtype and y.shape == (p * m, c) and out.shape == (p, c)
    assert idx.dtype == torch.int16 and 0 <= idx.min() and idx.max() < m
    low = dtype != torch.float32
    for got, ref in ((y, want_y), (out, want)):
        if low:
            assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
            assert (got != ref).float().mean().item() < 0.02
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the value at the argmax is the max, exactly (it is taken from y as stored)
    assert torch.equal(y.reshape(p, m, c).gather(1, idx.long()[:, None]).squeeze(1), out)
    assert (idx == want_idx).float().mean() > 0.97  # (near-ties may differ)
    got = triton_ops.point_mlp_bwd(*_on((gy, gout, idx)), *_on(first), w2.to(DEV), m)
    ref = R.point_mlp_bwd(gy, gout, idx, *first, w2, m)
    for name, a, r in zip(("w2, b2", "sums"), got, ref):
        a = a.cpu()
        assert a.dtype == r.dtype and a.shape == r.shape, name
        err = ((a.float() - r.float()).norm() / r.float().norm()).item()
        assert err < (1e-2 if low and name == "w2, b2" else 1e-5), (name, err)


def test_ties_go_to_the_first_point_and_nan_propagates(interpreted):
    first, w2, b2, _, _ = _inputs(4, 20, 16, 24, torch.float32)
    x = first[0]
    x[20:40] = x[23]  # patch 1: one point repeated, every channel ties
    x[47, 1] = float("nan")  # patch 2: a NaN point (its ReLU keeps the NaN, as torch.relu)
    y, out, idx = (t.cpu() for t in triton_ops.point_mlp_fwd(*_on(first), *_on((w2, b2)), 20))
    assert (idx[1] == 0).all()
    assert out[2].isnan().all() and y[47].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_one_split_and_many_of_the_weight_gradient(interpreted, monkeypatch):
    """fc2's weight gradient is summed over splits of the patches: the same for 1 and many."""
    first, w2, b2, gy, gout = _inputs(7, 16, 16, 24, torch.float32)
    idx = triton_ops.point_mlp_fwd(*_on(first), *_on((w2, b2)), 16)[2]
    got = []
    for programs in (1, 10_000):
        monkeypatch.setattr(triton_ops, "_PM_PROGRAMS", programs)
        got.append(triton_ops.point_mlp_bwd(*_on((gy, gout)), idx, *_on(first), w2.to(DEV),
                                            16)[0].cpu())
    torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=1e-6)
    want = R.point_mlp_bwd(gy, gout, idx.cpu(), *first, w2, 16)[0]
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def _layers(x, w1, b1, scale, shift, w2, b2):
    y = F.linear(torch.relu(F.linear(x, w1, b1) * scale + shift), w2, b2)
    return y, y.max(dim=1).values


def test_public_op_equals_the_layers_with_gradients():
    """On CPU (the reference path) the op is fc1, the affine, ReLU, fc2 and the max: values,
    and the gradients of all six parameters from gradients of both outputs; autocast gives
    bf16 outputs as F.linear's; the points take no gradient."""
    (x, *params), w2, b2, _, _ = _inputs(6, 10, 12, 20, torch.float32)
    x = x.reshape(6, 10, 3)
    params = [t.requires_grad_() for t in (*params, w2, b2)]
    w1, b1, scale, shift, w2, b2 = params
    got = kernels.point_mlp_max(x, w1, b1, w2, b2, scale=scale, shift=shift)
    want = _layers(x, w1, b1, scale, shift, w2, b2)
    gs = [torch.randn_like(t) for t in want]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for a, e in zip(torch.autograd.grad(got, params, gs, retain_graph=True),
                    torch.autograd.grad(want, params, gs, retain_graph=True)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    # the gradient of one output alone (the other's is None)
    for a, e in zip(torch.autograd.grad(got[1], params, gs[1]),
                    torch.autograd.grad(want[1], params, gs[1])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        y, out = kernels.point_mlp_max(x, w1, b1, w2, b2, scale=scale, shift=shift)
    assert y.dtype == out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no gradient for x"):
        kernels.point_mlp_max(x.requires_grad_(), w1, b1, w2, b2, scale=scale, shift=shift)


@pytest.mark.parametrize("change,match", [
    ({"x": torch.zeros(12, 3)}, r"x must be a \(P, M, K0\) tensor, got shape \(12, 3\)"),
    ({"w1": torch.zeros(8, 2)}, r"w1 must have shape \(H, 3\).*\(8, 2\)"),
    ({"w2": torch.zeros(5, 7)}, r"w2 must have shape \(C, 8\) for w1 of shape \(8, 3\)"),
    ({"scale": torch.zeros(7)}, r"scale must have shape \(8,\), got shape \(7,\)"),
    ({"b2": None}, r"b2 must have shape \(5,\), got NoneType"),
    ({"x": torch.zeros(2, 6, 3, dtype=torch.long)}, "x must be a float tensor"),
])
def test_bad_input_raises(change, match):
    args = {"x": torch.zeros(2, 6, 3), "w1": torch.zeros(8, 3), "b1": torch.zeros(8),
            "w2": torch.zeros(5, 8), "b2": torch.zeros(5), "scale": torch.ones(8),
            "shift": torch.zeros(8), **change}
    with pytest.raises(ValueError, match=match):
        kernels.point_mlp_max(args["x"], args["w1"], args["b1"], args["w2"], args["b2"],
                              scale=args["scale"], shift=args["shift"])


def test_check_at_first_use_catches_a_wrong_kernel(fresh, monkeypatch):
    """A kernel that gives wrong first-layer sums fails its check on first use: the op warns
    and uses the reference, which still gives the right gradients."""
    from kernels import verify

    bwd = triton_ops.point_mlp_bwd

    def wrong(*args):
        dw2b, sums = bwd(*args)
        return dw2b, sums * 1.01

    monkeypatch.setattr(triton_ops, "point_mlp_bwd", wrong)
    (x, *params), w2, b2, _, _ = _inputs(3, 16, 8, 12, torch.float32)
    params = [t.to(DEV).requires_grad_() for t in (*params, w2, b2)]
    w1, b1, scale, shift, w2, b2 = params
    x = x.reshape(3, 16, 3).to(DEV)
    with pytest.warns(verify.KernelCheckWarning, match=r"point_mlp\[m=16,float32,k0=3"):
        got = kernels.point_mlp_max(x, w1, b1, w2, b2, scale=scale, shift=shift)
    want = _layers(x, w1, b1, scale, shift, w2, b2)
    for a, e in zip(torch.autograd.grad(got[1].sum(), params),
                    torch.autograd.grad(want[1].sum(), params)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    summary = verify.summary()
    assert summary["fallback"] == ["point_mlp"]
    assert [v["ok"] for k, v in summary["variants"].items() if "point_mlp" in k] == [False]
