"""Benchmark the Triton kernels against the plain-PyTorch reference on the GPU.

    python -m kernels.bench            # training shapes
    python -m kernels.bench --quick    # fewer repetitions
    python -m kernels.bench --smoke    # every case once at toy sizes, on CPU under
                                       # TRITON_INTERPRET=1 when there is no GPU (tests)

Times are medians over repetitions measured with CUDA events after warm-up. "torch" is
``kernels.reference`` run on the same GPU tensors. ratio = torch / triton (speed-up).
On a machine without CUDA it prints a line saying so and exits 0 (except with --smoke).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import reference


def _median_us(fn, warmup: int, reps: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":  # --smoke on CPU: wall time, meaningless but exercises the path
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)  # ms -> µs
    return statistics.median(times)


def _cloud(B, N, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, 3, generator=g)
    return (x / x.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)).to(device)


def _cases(device, smoke: bool = False):
    """Yield (op, shape, triton_fn, torch_fn). smoke: toy sizes (the same code paths)."""
    from . import triton_ops as T

    clouds = [(2, 64, 8)] if smoke else [(128, 1024, 64), (32, 2048, 128), (32, 8192, 512)]
    for B, N, G in clouds:
        x = _cloud(B, N, device)
        yield "fps", f"{B}x{N}->{G}", lambda x=x, G=G: T.fps(x, G), lambda x=x, G=G: reference.fps(x, G)
    for B, N, G in clouds:
        x = _cloud(B, N, device)
        c = reference.gather_points(x, reference.fps(x, G))  # queries = the FPS centers
        yield ("knn", f"{B}x{G} q, {N} ref, k=32",
               lambda c=c, x=x: T.knn(c, x, 32), lambda c=c, x=x: reference.knn(c, x, 32))

    # Chamfer of the loss: one call on P = 2 x 8192 = 16384 patch pairs of 32 vs 32 points
    # (both views of batch 128 x 64 patches), forward + backward; the targets carry no grad.
    P = 8 if smoke else 16384
    tgt = torch.randn(P, 32, 3, device=device) * 0.1
    pred = (tgt + 0.01 * torch.randn_like(tgt)).requires_grad_(True)

    def cd(fn):
        def run():
            da, db = fn(pred, tgt)
            (da.mean() + db.mean()).backward()
        return run

    yield "chamfer fwd+bwd", f"P={P} (one call), 32 vs 32", cd(T.chamfer_l2), cd(reference.chamfer_l2)
    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(pred, tgt)
        return run

    yield "chamfer fwd", f"P={P} (one call), 32 vs 32", fwd(T.chamfer_l2), fwd(reference.chamfer_l2)

    # group of both views: batch 128, views of 800 and 900 points, G=64, M=32
    B, n1, n2, G = (2, 80, 90, 16) if smoke else (128, 800, 900, 64)
    v1, v2 = _cloud(B, n1, device, 1), _cloud(B, n2, device, 2)

    def grp(fn):
        def run():
            fn(v1, G, 32)
            fn(v2, G, 32)
        return run

    yield ("group (2 views)", f"{B}x{n1} + {B}x{n2}, G={G}, M=32", grp(T.group),
           grp(reference.group))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm-up runs and repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="every case once at toy sizes (on CPU without a GPU: needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("kernels.bench: no CUDA device available; nothing to benchmark.")
        return 0
    warmup, reps = (0, 1) if args.smoke else (2, 5) if args.quick else (5, 25)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
    print(f"device: {name}; median of {reps} runs after {warmup} warm-up")
    header = f"{'op':<18} {'shape':<32} {'triton µs':>11} {'torch µs':>11} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for op, shape, tri, ref in _cases(device, smoke=args.smoke):
        t = _median_us(tri, warmup, reps, device)
        r = _median_us(ref, warmup // 2 if args.smoke else max(1, warmup // 2),
                       reps if args.smoke else max(3, reps // 3), device)
        print(f"{op:<18} {shape:<32} {t:>11.1f} {r:>11.1f} {r / t:>6.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
