"""pqae.syncbn: BatchNorm over the global batch of two gloo processes equals nn.BatchNorm1d over
the whole batch in one process (outputs, input and parameter gradients, running statistics),
for (N, C) and (N, C, L) inputs, over two steps; torch.compile traces it as one graph."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pqae import syncbn


def _exit_now():
    """A worker that passed ends here, skipping the interpreter's finalisation: gloo's threads
    can still hold work objects then, and releasing them without the GIL aborts the process
    (SIGABRT, "terminate called without an active exception"; seen once in CI in the
    compiled test, under load). A failure raises before this, so mp.spawn still reports it."""
    import sys
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _net(dtype):
    torch.manual_seed(0)
    return nn.ModuleDict({
        "conv": nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 4, 1)),
        "mlp": nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None), nn.Linear(6, 2)),
    }).to(dtype)


def _loss(net, x, w1, w2):
    h = net["conv"](x)  # (n, 4, L)
    return (h * w1).sum() + (net["mlp"](h.amax(-1)) * w2).sum()


def _worker(rank: int, init: str, dtype: torch.dtype, tol: float):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(1)
        ref, mine = _net(dtype), syncbn.convert(_net(dtype))
        assert sum(isinstance(m, syncbn.GlobalBatchNorm1d) for m in mine.modules()) == 2
        assert mine.state_dict().keys() == ref.state_dict().keys()
        for it in range(2):  # the second step normalises about a non-zero running mean
            x = (torch.randn(10, 3, 7, generator=g, dtype=dtype) * 3 + 5).requires_grad_(True)
            w1 = torch.randn(10, 4, 7, generator=g, dtype=dtype)
            w2 = torch.randn(10, 2, generator=g, dtype=dtype)
            part = slice(5 * rank, 5 * rank + 5)
            xr = x.detach()[part].clone().requires_grad_(True)
            _loss(ref, x, w1, w2).backward()
            _loss(mine, xr, w1[part], w2[part]).backward()
            torch.testing.assert_close(xr.grad, x.grad[part], rtol=tol, atol=tol)
            for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
                grad = q.grad.clone()
                dist.all_reduce(grad)  # each rank holds its share of the global loss
                torch.testing.assert_close(grad, p.grad, rtol=tol, atol=tol, msg=name)
            for (name, b), c in zip(ref.named_buffers(), mine.buffers()):
                torch.testing.assert_close(c, b, rtol=tol, atol=tol, msg=name)
            ref.zero_grad(), mine.zero_grad()
        mine.eval()  # eval mode: the running statistics, as nn.BatchNorm1d
        ref.eval()
        x = torch.randn(4, 3, 7, generator=g, dtype=dtype)
        torch.testing.assert_close(mine["conv"](x), ref["conv"](x), rtol=tol, atol=tol)
        # syncbn.affine (the BatchNorm that kernels.linear_patch_max applies itself): the
        # global batch's scale and shift, their gradients, the running statistics
        bns = [nn.BatchNorm1d(6).to(dtype), syncbn.convert(nn.Sequential(nn.BatchNorm1d(6)))[0]]
        bns[1].to(dtype)
        z = (torch.randn(10, 6, generator=g, dtype=dtype) * 2 + 1).requires_grad_(True)
        w3 = torch.randn(10, 6, generator=g, dtype=dtype)
        zr = z.detach()[part].clone().requires_grad_(True)
        (bns[0](z) * w3).sum().backward()
        scale, shift = syncbn.affine(bns[1], zr)
        ((zr * scale + shift) * w3[part]).sum().backward()
        torch.testing.assert_close(zr.grad, z.grad[part], rtol=tol, atol=tol)
        for p_ref, p_mine in zip(bns[0].parameters(), bns[1].parameters()):
            grad = p_mine.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, rtol=tol, atol=tol)
        for b_ref, b_mine in zip(bns[0].buffers(), bns[1].buffers()):
            torch.testing.assert_close(b_mine, b_ref, rtol=tol, atol=tol)
        # syncbn.linear_affine (kernels.point_mlp_max's BatchNorm of fc1(points)): the global
        # batch's statistics from the ranks' moments; fc1's and bn's gradients, running stats
        fc = [nn.Linear(3, 6).to(dtype) for _ in range(2)]
        fc[1].load_state_dict(fc[0].state_dict())
        bns = [nn.BatchNorm1d(6).to(dtype), syncbn.convert(nn.Sequential(nn.BatchNorm1d(6)))[0]]
        bns[1].to(dtype)
        pts = torch.randn(10, 3, generator=g, dtype=dtype) * 2 + 1
        (bns[0](fc[0](pts)) * w3).sum().backward()
        scale, shift = syncbn.linear_affine(bns[1], pts[part], fc[1].weight, fc[1].bias)
        ((fc[1](pts[part]) * scale + shift) * w3[part]).sum().backward()
        for p_ref, p_mine in zip([*fc[0].parameters(), *bns[0].parameters()],
                                 [*fc[1].parameters(), *bns[1].parameters()]):
            grad = p_mine.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, rtol=tol, atol=tol)
        for b_ref, b_mine in zip(bns[0].buffers(), bns[1].buffers()):
            torch.testing.assert_close(b_mine, b_ref, rtol=tol, atol=tol)
        dist.barrier()  # both ranks done before either tears gloo down (an early one aborts)
    finally:
        dist.destroy_process_group()
    _exit_now()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_global_batchnorm_equals_batchnorm_over_the_global_batch(dtype, tol):
    """float64: equal to 1e-10 (the same function); float32: to rounding (the combination of
    the ranks' statistics rounds differently from BatchNorm's kernels)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(f"file://{os.path.join(d, 'store')}", dtype, tol), nprocs=2)


def _compiled_worker(rank: int, init: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = syncbn.convert(nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU()))
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # a break raises
        x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(rank))
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        compiled(x1).square().sum().backward()
        net(x2).square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        dist.barrier()  # both ranks done before either tears gloo down (an early one aborts)
    finally:
        dist.destroy_process_group()
    _exit_now()


def test_compiles_as_one_graph_under_ddp():
    """torch.compile traces the collective: one graph, no break (SyncBatchNorm breaks it)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_compiled_worker, args=(f"file://{os.path.join(d, 'store')}",), nprocs=2)


def test_affine_is_the_batchnorm_in_one_process():
    """syncbn.affine without a process group: x * scale + shift is nn.BatchNorm1d's output,
    with its gradients and running statistics (momentum 0.1 and None), then in eval mode."""
    for momentum in (0.1, None):
        torch.manual_seed(0)
        bn, twin = nn.BatchNorm1d(5, momentum=momentum), nn.BatchNorm1d(5, momentum=momentum)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        twin.load_state_dict(bn.state_dict())
        for step in range(3):
            if step == 2:
                bn.eval(), twin.eval()
            x = (torch.randn(16, 5) * 3 + step).requires_grad_(True)
            x2 = x.detach().clone().requires_grad_(True)
            w = torch.randn(16, 5)
            out = bn(x)
            (out * w).sum().backward()
            scale, shift = syncbn.affine(twin, x2)
            y = x2 * scale + shift
            (y * w).sum().backward()
            torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
            for a, b in zip(twin.parameters(), bn.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
            for a, b in zip(twin.buffers(), bn.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert int(twin.num_batches_tracked) == 2


def test_single_process_is_plain_batchnorm(monkeypatch):
    """Without a process group it is nn.BatchNorm1d; in one, inputs of rank 4 are refused."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    gbn = syncbn.convert(nn.Sequential(nn.BatchNorm1d(5)))[0]
    x = torch.randn(8, 5, 3)
    torch.testing.assert_close(gbn(x), bn(x))
    torch.testing.assert_close(gbn.running_mean, bn.running_mean)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="expected"):
        gbn(torch.randn(2, 5, 3, 3))


def test_linear_affine_is_the_batchnorm_of_the_linear_layer_in_one_process():
    """syncbn.linear_affine(bn, x, w, b) from x's moments: F.linear(x, w, b) * scale + shift
    is bn(F.linear(x, w, b)), with the gradients of w, b and bn's parameters and bn's running
    statistics, over two training steps (far from the origin: no cancellation), then in eval
    mode; and under autocast still float32 (its moments are not bf16 GEMMs)."""
    torch.manual_seed(0)
    fc, bn = nn.Linear(3, 7), nn.BatchNorm1d(7)
    fc2, bn2 = nn.Linear(3, 7), nn.BatchNorm1d(7)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    fc2.load_state_dict(fc.state_dict()), bn2.load_state_dict(bn.state_dict())
    for step in range(3):
        if step == 2:
            bn.eval(), bn2.eval()
        x = torch.randn(40, 3) * (step + 1) + 10 * step
        w = torch.randn(40, 7)
        out = bn(fc(x))
        (out * w).sum().backward()
        scale, shift = syncbn.linear_affine(bn2, x, fc2.weight, fc2.bias)
        y = fc2(x) * scale + shift
        torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
        (y * w).sum().backward()
        for p, q in zip([*fc.parameters(), *bn.parameters()],
                        [*fc2.parameters(), *bn2.parameters()]):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4)
            p.grad = q.grad = None
        for a, b in zip(bn.buffers(), bn2.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    bn2.train()
    with torch.autocast("cpu", torch.bfloat16):
        scale, shift = syncbn.linear_affine(bn2, x, fc2.weight, fc2.bias)
    assert scale.dtype == shift.dtype == torch.float32
    var = fc2(x).var(0, unbiased=False).detach()
    torch.testing.assert_close(scale.detach(), bn2.weight.detach() / (var + bn2.eps).sqrt(),
                               rtol=1e-5, atol=1e-6)
