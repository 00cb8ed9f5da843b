"""Benchmark the Triton kernels against the plain-PyTorch reference on the GPU.

    python -m kernels.bench            # training shapes
    python -m kernels.bench --quick    # fewer repetitions
    python -m kernels.bench --smoke    # every case once at toy sizes, on CPU under
                                       # TRITON_INTERPRET=1 when there is no GPU (tests)
    python -m kernels.bench --static   # no GPU needed: the kernels compiled for sm_90, their
                                       # registers, spills, SASS instructions and the estimated
                                       # time on an H100 beside the targets (--json: one object)

Times are medians over repetitions measured with CUDA events after warm-up. "torch" is
``kernels.reference`` run on the same GPU tensors. ratio = torch / triton (speed-up).
On a machine without CUDA it prints a line saying so and exits 0 (except with --smoke and
--static). The --static figures are estimates from the compiled code (``kernels/static.py``
says how), never measurements.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import reference


def median_us(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median time of fn() in µs after warm-up: CUDA events on a GPU (wall time elsewhere)."""
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

    # The loss of a pretraining step: both views, P = 8192 patch pairs of 32 vs 32 points each,
    # forward + backward; the targets carry no gradient.
    P = 8 if smoke else 128 * 64
    tgts = [torch.randn(P, 32, 3, device=device) * 0.1 for _ in range(2)]
    preds = [(t + 0.01 * torch.randn_like(t)).requires_grad_(True) for t in tgts]

    def cd_loss(fn):
        def run():
            sum(fn(preds, tgts)).backward()
        return run

    yield ("chamfer loss", f"2 views x P={P}, 32 vs 32, fwd+bwd", cd_loss(T.chamfer_l2_loss),
           cd_loss(reference.chamfer_l2_loss))

    def cd(fn):  # the per-point op (any upstream gradient), on one view
        def run():
            da, db = fn(preds[0], tgts[0])
            (da.mean() + db.mean()).backward()
        return run

    yield "chamfer fwd+bwd", f"P={P}, 32 vs 32 (per point)", cd(T.chamfer_l2), cd(reference.chamfer_l2)

    # grouping of both views of a pretraining step: batch 128, views of 800 and 900 points
    B, n1, n2, G = (2, 80, 90, 16) if smoke else (128, 800, 900, 64)
    v1, v2 = _cloud(B, n1, device, 1), _cloud(B, n2, device, 2)

    def grp(fn):
        return lambda: fn([v1, v2], G, 32)

    yield ("group (2 views)", f"{B}x{n1} + {B}x{n2}, G={G}, M=32", grp(T.group_views),
           grp(reference.group_views))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm-up runs and repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="every case once at toy sizes (on CPU without a GPU: needs TRITON_INTERPRET=1)")
    ap.add_argument("--static", action="store_true",
                    help="no GPU: compile for sm_90 and print the static cost report")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (the table goes to stderr)")
    ap.add_argument("--arch", type=int, default=90, help="with --static: the sm_ target")
    ap.add_argument("--workload", nargs="+", help="with --static: only these workloads")
    ap.add_argument("--check", action="store_true",
                    help="with --static: first compile every launch (python -m kernels.static) "
                         "for --arch; exit 1 on a compile error or a spill")
    args = ap.parse_args(argv)
    if args.static:
        return _static(args.arch, args.json, args.workload, args.check)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("kernels.bench: no CUDA device available; nothing to benchmark.")
        return 0
    warmup, reps = (0, 1) if args.smoke else (2, 5) if args.quick else (5, 25)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
    out = sys.stderr if args.json else sys.stdout
    print(f"device: {name}; median of {reps} runs after {warmup} warm-up", file=out)
    header = f"{'op':<18} {'shape':<32} {'triton µs':>11} {'torch µs':>11} {'ratio':>7}"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for op, shape, tri, ref in _cases(device, smoke=args.smoke):
        t = median_us(tri, warmup, reps, device)
        r = median_us(ref, warmup // 2 if args.smoke else max(1, warmup // 2),
                       reps if args.smoke else max(3, reps // 3), device)
        rows.append({"op": op, "shape": shape, "triton_us": t, "torch_us": r})
        print(f"{op:<18} {shape:<32} {t:>11.1f} {r:>11.1f} {r / t:>6.1f}x", flush=True, file=out)
    if args.json:
        import json

        print(json.dumps({"device": name, "warmup": warmup, "reps": reps, "rows": rows}))
    return 0


def _static(arch: int, as_json: bool, names=None, check: bool = False) -> int:
    import json
    import os

    from . import static

    failed = []
    if check:
        bad = [r for r in static.check((arch,), min(8, os.cpu_count() or 1)) if r["error"]]
        failed = [f"{r['kernel']} ({r['workload']}): {r['error']}" for r in bad]
        print("\n".join(failed) or f"every launch compiles for sm_{arch} without a spill",
              file=sys.stderr)
    ws = [w for w in static.workloads() if not names or w.name in names]
    if names and len(ws) != len(names):
        raise SystemExit(f"unknown workload in {names}; known: "
                         f"{', '.join(w.name for w in static.workloads())}")
    rows = static.report(ws, arch=arch)
    if as_json:
        print(json.dumps({"device_model": static.H100.name, "arch": arch,
                          "versions": static.versions(arch), "check_failures": failed,
                          "rows": rows}))
    else:
        print(static.format_table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
