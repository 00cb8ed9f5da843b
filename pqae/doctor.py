"""What to run first on a new machine, and paste into a bug report.

    python -m pqae.doctor                    # about a minute on one GPU; seconds on a CPU
    python -m pqae.doctor --json doctor.json # the same, and every figure as JSON
    python -m pqae.doctor --no-benchmark     # machine and kernels only

It prints, in order:
1. the machine: GPUs (memory, compute capability), driver, CUDA, torch, Triton, NumPy, whether
   Triton can build its launcher (a C compiler and Python.h), the processes torchrun would
   start (--nproc_per_node = GPUs);
2. every Triton kernel variant the five scripts launch at their reference recipes: compiled,
   checked against the PyTorch reference (kernels/verify.py; worst error) and, on a GPU, its
   time beside the reference's (median of CUDA-event timings after warm-up, at the scripts'
   real sizes);
3. a 20-step pretraining benchmark of the reference model at batch 128 on generated 8192-point
   clouds, fp32 plain PyTorch and --amp --compile: ms/step, peak memory, and the projected time
   of the reference recipe on ShapeNet-55 on this one GPU;
4. a verdict: ready, or what to fix, one sentence each.

Without a GPU it runs the same checks with Triton's interpreter at toy sizes and the benchmark
at toy sizes, and says that speed figures need a GPU. `.ci/gpu` (the maintainers' longer GPU
check) takes its preflight and its pretraining benchmark from here.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

# Without a GPU the kernels can only run under Triton's interpreter, which Triton reads when it
# is first imported. (Only as `python -m pqae.doctor`: importing this module changes nothing.)
if (__name__ == "__main__" and "triton" not in sys.modules
        and not os.environ.get("TRITON_INTERPRET")):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # reported by machine()
        pass

import torch  # noqa: E402


# ----------------------------------------------------------------------------- 1. the machine
def machine(gpu_expected: bool | None = None) -> dict:
    """What Triton and the scripts need of this machine, and the versions. Problems are listed
    (one sentence each), not raised. gpu_expected: whether a missing GPU is a problem (default:
    only when torch is a CUDA build)."""
    out, problems = {}, []
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    out["c_compiler"] = cc
    if not cc:
        problems.append("no C compiler (cc, gcc or clang, or $CC): Triton builds its launcher "
                        "with one, so install gcc, or every kernel falls back to the reference")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    out["python_h"] = str(header) if header.exists() else None
    if not header.exists():
        problems.append(f"no {header}: Triton's launcher needs the Python headers, so install "
                        "python3-dev (or your Python's equivalent)")
    out["python"] = sys.version.split()[0]
    import numpy

    out["numpy"] = numpy.__version__
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    out["gpus"] = []
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                "capability": f"sm_{p.major}{p.minor}"})
        out["device"] = out["gpus"][0]["name"]
        out["capability"] = out["gpus"][0]["capability"]
    out["nproc_per_node"] = max(1, len(out["gpus"]))
    try:
        import triton

        out["triton"] = triton.__version__
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(90)
        except TypeError:  # a Triton whose get_ptxas takes no architecture
            tool = get_ptxas()
        out["ptxas"] = f"{tool.path} (CUDA {tool.version})"
        ptxas_cuda = tool.version
    except Exception as e:  # noqa: BLE001  (reported)
        out.setdefault("triton", None)
        problems.append(f"Triton or its ptxas is missing ({type(e).__name__}: {e}), so install "
                        "triton (pip install triton) or the kernels run on the PyTorch reference")
        ptxas_cuda = None
    try:
        ctypes.CDLL("libcuda.so.1")
        out["libcuda"] = "libcuda.so.1 loads"
    except OSError as e:
        out["libcuda"] = None
        if out["cuda_available"]:
            problems.append(f"libcuda.so.1 does not load ({e}): set TRITON_LIBCUDA_PATH to the "
                            "folder that holds it")
    from kernels import verify

    out["driver"] = verify.driver_version()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi], capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = r.stdout.strip()
            m = re.search(r"Driver Version:\s*([\d.]+).*?CUDA Version:\s*([\d.]+)", r.stdout)
            if m:
                out["driver"], out["driver_cuda"] = m.groups()
                if ptxas_cuda and _version(ptxas_cuda) > _version(out["driver_cuda"]):
                    problems.append(
                        f"Triton's ptxas (CUDA {ptxas_cuda}) is newer than the driver's CUDA "
                        f"{out['driver_cuda']}: if kernels fail to load, point TRITON_PTXAS_PATH "
                        f"at a ptxas of CUDA <= {out['driver_cuda']}, or update the driver")
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"failed: {e}"
    if gpu_expected is None:
        gpu_expected = torch.version.cuda is not None
    if gpu_expected and not out["cuda_available"]:
        problems.append("torch sees no CUDA device: check nvidia-smi, the driver and "
                        "CUDA_VISIBLE_DEVICES (training would run on the CPU)")
    out["kernel_cache"] = str(verify.cache_dir())
    out["problems"] = problems
    return out


def _version(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


# ----------------------------------------------------------------------------- 2. the kernels
@dataclasses.dataclass
class KernelCase:
    """One kernel variant a script launches: the op and its sizes (on a GPU: the reference
    recipe's, on a CPU: toy sizes that take the same code path, so the interpreter is quick)."""
    scripts: str
    what: str
    op: str
    gpu: dict
    cpu: dict


_BF16 = torch.bfloat16
CASES = [
    KernelCase("pretrain", "grouping of the two views (1024-point clouds cropped to 60-100 %)",
               "group", dict(B=128, ns=(1023, 700), G=64, k=32),
               dict(B=2, ns=(250, 170), G=8, k=16)),
    KernelCase("pretrain", "Chamfer-L2 loss with its gradient, --amp (bf16 predictions)",
               "chamfer_loss", dict(P=128 * 64, n=32, m=32, dtype=_BF16),
               dict(P=16, n=16, m=16, dtype=_BF16)),
    KernelCase("pretrain", "Chamfer-L2 loss with its gradient, float32", "chamfer_loss",
               dict(P=128 * 64, n=32, m=32, dtype=torch.float32),
               dict(P=16, n=16, m=16, dtype=torch.float32)),
    KernelCase("finetune_cls, fewshot", "ModelNet40: FPS of the 1200-point pool of 8192 points",
               "fps", dict(B=32, N=8192, m=1200), dict(B=2, N=300, m=40)),
    KernelCase("finetune_cls, fewshot", "ModelNet40 1k: grouping, 64 x 32 of 1024 points",
               "group", dict(B=32, ns=(1024,), G=64, k=32), dict(B=2, ns=(200,), G=8, k=16)),
    KernelCase("finetune_cls, partseg, semseg",
               "ScanObjectNN / ShapeNetPart / S3DIS: grouping, 128 x 32 of 2048 points", "group",
               dict(B=32, ns=(2048,), G=128, k=32), dict(B=1, ns=(1100,), G=3, k=4)),
    KernelCase("finetune_cls", "ModelNet40 8k: grouping, 512 x 32 of 8192 points", "group",
               dict(B=32, ns=(8192,), G=512, k=32), dict(B=1, ns=(4100,), G=2, k=4)),
    KernelCase("partseg, semseg", "feature propagation: 3 nearest of 128 centres per point",
               "knn", dict(B=16, S=2048, N=128, k=3), dict(B=2, S=40, N=100, k=3)),
    KernelCase("all four training scripts, with --fused-embed",
               "the patch embedding's BatchNorm + ReLU + fc4 + max over each patch, forward "
               "and backward, --amp (one view of pretraining)", "patch_max",
               dict(P=128 * 64, M=32, K=512, C=384, dtype=_BF16),
               dict(P=9, M=16, K=32, C=24, dtype=_BF16)),
    KernelCase("all four training scripts, with --fused-embed",
               "the patch embedding's fc1 + BatchNorm + ReLU + fc2 + max over each patch, "
               "forward and backward, --amp (one view of pretraining)", "point_mlp",
               dict(P=128 * 64, M=32, H=128, C=256, dtype=_BF16),
               dict(P=9, M=16, H=24, C=40, dtype=_BF16)),
]


def _inputs(case: KernelCase, sizes: dict, device: torch.device):
    """(spec arguments, a call of the Triton op, a call of the reference op) at these sizes."""
    from kernels import reference as R
    from kernels import triton_ops as T

    g = torch.Generator().manual_seed(0)

    def cloud(*shape, dtype=torch.float32):
        return torch.rand(*shape, 3, generator=g).to(device=device, dtype=dtype)

    s = sizes
    if case.op == "group":
        views = [cloud(s["B"], n) for n in s["ns"]]
        return ((s["ns"], s["G"], s["k"]), lambda: T.group_views(views, s["G"], s["k"]),
                lambda: R.group_views(views, s["G"], s["k"]))
    if case.op == "fps":
        x = cloud(s["B"], s["N"])
        return (s["N"],), lambda: T.fps(x, s["m"]), lambda: R.fps(x, s["m"])
    if case.op == "knn":
        q, x = cloud(s["B"], s["S"]), cloud(s["B"], s["N"])
        return (s["N"], s["k"]), lambda: T.knn(q, x, s["k"]), lambda: R.knn(q, x, s["k"])
    if case.op == "chamfer_loss":
        a = [cloud(s["P"], s["n"], dtype=s["dtype"]).requires_grad_(True) for _ in range(2)]
        b = [cloud(s["P"], s["m"]) for _ in range(2)]

        def step(fn):
            return lambda: sum(fn(a, b)).backward()
        return ((s["n"], s["m"], s["dtype"], torch.float32, False), step(T.chamfer_l2_loss),
                step(R.chamfer_l2_loss))
    if case.op == "patch_max":
        x, w, b, add, grad = (torch.randn(*shape, generator=g).to(device=device, dtype=s["dtype"])
                              for shape in ((s["P"] * s["M"], s["K"]), (s["C"], s["K"]), (s["C"],),
                                            (s["P"], s["K"]), (s["P"], s["C"])))
        bn = (add, torch.rand(s["K"], generator=g).to(device) + 0.5,
              torch.randn(s["K"], generator=g).to(device))

        def fwd_bwd(ops):  # as training runs it: the forward, then the gradients
            return lambda: ops.patch_max_bwd(grad, ops.patch_max_fwd(x, w, b, s["M"], bn)[1], x,
                                             w, s["M"], (True, True, True), bn)
        return ((s["M"], s["dtype"], True, s["C"], s["K"], True), fwd_bwd(T), fwd_bwd(R))
    if case.op == "point_mlp":
        first = [torch.randn(*shape, generator=g).to(device) for shape in
                 ((s["P"] * s["M"], 3), (s["H"], 3), (s["H"],), (s["H"],), (s["H"],))]
        w2, b2, gy, gout = (torch.randn(*shape, generator=g).to(device=device, dtype=s["dtype"])
                            for shape in ((s["C"], s["H"]), (s["C"],), (s["P"] * s["M"], s["C"]),
                                          (s["P"], s["C"])))

        def mlp_fwd_bwd(ops):  # as training runs it: the forward, then the gradients
            return lambda: ops.point_mlp_bwd(
                gy, gout, ops.point_mlp_fwd(*first, w2, b2, s["M"])[2], *first, w2, s["M"])
        return ((s["M"], s["dtype"], 3, s["H"], s["C"]), mlp_fwd_bwd(T), mlp_fwd_bwd(R))
    raise ValueError(case.op)


def check_kernels(device: torch.device, timing: bool) -> list[dict]:
    """Every case: its variant's check (from this machine's cache when it was checked before)
    and, with timing, Triton's and the reference's median time at the case's sizes."""
    from kernels import verify
    from kernels.bench import median_us

    rows = []
    for case in CASES:
        sizes = case.gpu if device.type == "cuda" else case.cpu
        row = {"scripts": case.scripts, "what": case.what, "op": case.op}
        try:
            args, tri, ref = _inputs(case, sizes, device)
            spec = verify.spec(case.op, *args)
            row["variant"] = spec.key
            t0, n0 = time.perf_counter(), verify.checks_run
            with warnings.catch_warnings():  # this report says it, with what to do
                warnings.simplefilter("ignore", verify.KernelCheckWarning)
                row["ok"] = verify.ensure(spec, device)
            v = verify.verdict(spec, device)
            row.update(error=v["error"], detail=v["detail"], cached=bool(v.get("from_cache")))
            if verify.checks_run > n0:  # else: the cache's verdict, or a case above's
                row["check_s"] = round(time.perf_counter() - t0, 2)
            if timing and row["ok"]:
                row["triton_ms"] = median_us(tri, 3, 15, device) / 1e3
                row["torch_ms"] = median_us(ref, 3, 15, device) / 1e3
        except torch.cuda.OutOfMemoryError as e:
            row.update(ok=False, detail=f"out of memory at the recipe's size: {e}")
        except Exception as e:  # noqa: BLE001  (a broken install: reported, not raised)
            row.update(ok=False, detail=f"{type(e).__name__}: {str(e).strip()[:300]}")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 3. the benchmark
def pretrain_benchmark(device: str, steps: int, toy: bool, compile: bool = True,
                       phases: bool = False, **extra) -> dict:
    """ms/step and peak memory of the reference pretraining step at batch 128 on generated
    8192-point clouds: the plain-PyTorch fp32 path and --amp (--compile). toy: the tiny preset
    at toy sizes, no compile (a CPU). phases: also the per-phase profile (.ci/gpu). extra:
    more config fields (cuda_graph, benchmark_compare). Returns pretrain.benchmark's
    results."""
    import pretrain

    over = dict(data="procedural", procedural_points=512 if toy else 8192,
                procedural_shapes=64 if toy else 1024, benchmark_steps=steps, amp=True,
                compile=compile and not toy, benchmark_phases=phases, device=device, **extra)
    cfg = dataclasses.replace(pretrain.PRESETS["tiny" if toy else "reference"], **over)
    return pretrain.main(cfg)


def projection(ms_per_step: float) -> dict:
    """The reference recipe's epochs of ShapeNet-55 at batch 128 on this one GPU."""
    import pretrain
    from pqae import data

    cfg = pretrain.PRESETS["reference"]
    steps = (cfg.epochs + 1) * (data.SHAPENET55_SHAPES // cfg.batch_size)
    return {"steps": steps, "hours": ms_per_step * steps / 3.6e6, "epochs": cfg.epochs}


# ----------------------------------------------------------------------------- 4. the verdict
def verdict(report: dict) -> list[str]:
    """What to fix, one sentence each; empty when ready."""
    out = list(report["machine"]["problems"])
    for r in report["kernels"]:
        if not r["ok"]:
            out.append(f"the Triton kernel {r.get('variant', r['op'])} ({r['what']}) failed its "
                       f"check ({r.get('detail')}): the scripts run it on the PyTorch reference "
                       "(correct, slower); please report this output")
    b = report.get("benchmark")
    if b and b.get("error"):
        fix = ("install the package and its dependencies: pip install -e ." if
               b["error"].startswith("ModuleNotFoundError") else "see its log above")
        out.append(f"the pretraining benchmark failed ({b['error']}): {fix}")
    return out


def _print_report(r: dict, out) -> None:
    m = r["machine"]
    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    p("== machine")
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, {g['capability']})" for g in m["gpus"])
    p(f"gpus       {gpus or 'none visible to torch'}")
    p(f"driver     {m.get('driver') or '-'} (CUDA {m.get('driver_cuda') or '-'}); torch "
      f"{m['torch']} (CUDA {m['torch_cuda'] or 'none: a CPU build'}); Triton {m.get('triton')}; "
      f"NumPy {m['numpy']}; Python {m['python']}")
    p(f"launcher   C compiler {m['c_compiler'] or 'MISSING'}; Python.h "
      f"{'found' if m['python_h'] else 'MISSING'}; ptxas {m.get('ptxas', '-')}")
    p(f"torchrun   --nproc_per_node={m['nproc_per_node']}")
    p(f"kernel checks cached in {m['kernel_cache']}")
    p("")
    p("== kernels (each variant the scripts launch: checked against the PyTorch reference"
      + ("; times at the recipes' sizes, median of CUDA events)" if r["timed"] else
         "; toy sizes under Triton's interpreter: speed figures need a GPU)"))
    for k in r["kernels"]:
        state = "ok    " if k["ok"] else "FAILED"
        err = "" if k.get("error") is None else f" error {k['error']:.1e}"
        where = (" (cached verdict)" if k.get("cached") else f" (checked in {k['check_s']} s)"
                 if "check_s" in k else " (as above)" if "variant" in k else "")
        t = (f" | Triton {k['triton_ms']:.3f} ms, torch {k['torch_ms']:.3f} ms "
             f"({k['torch_ms'] / k['triton_ms']:.1f}x)") if "triton_ms" in k else ""
        p(f"{state} {k.get('variant', k['op']):<52} {k['scripts']}: {k['what']}{err}{where}{t}")
        if not k["ok"]:
            p(f"       {k.get('detail')}")
    b = r.get("benchmark")
    if b:
        p("")
        p("== pretraining benchmark (" + ("reference model, batch 128, 8192-point clouds, "
          f"{b['steps']} timed steps)" if r["timed"] else "tiny preset at toy sizes on the CPU: "
          "speed figures need a GPU)"))
        for name, x in b.get("paths", {}).items():
            peak = "-" if x.get("peak_gib") is None else f"{x['peak_gib']:.2f} GiB"
            proj = f" | recipe on ShapeNet-55: {x['projected_hours']:.1f} h on this GPU" \
                if r["timed"] and "projected_hours" in x else ""
            p(f"{name:<28} {x['ms_per_step']:9.2f} ms/step | peak {peak}{proj}")
        if b.get("error"):
            p(f"FAILED: {b['error']}")
            for line in b.get("log_tail", "").splitlines()[-15:]:
                p(f"       {line}")
    p("")
    fix = r["verdict"]
    if fix:
        p("verdict: NOT READY")
        for f in fix:
            p(f"  - {f}")
    else:
        p("verdict: ready" + ("" if r["timed"] else " for CPU debugging (no GPU here: speed "
                                                     "figures need one)"))


def run(device: str | None = None, benchmark: bool = True, steps: int = 20,
        compile: bool = True, out=sys.stdout) -> dict:
    """Everything above; returns the report (what --json writes)."""
    t0 = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(dev),
              "timed": dev.type == "cuda", "machine": machine()}
    if dev.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        report["kernels"] = [{"scripts": c.scripts, "what": c.what, "op": c.op, "ok": False,
                              "detail": "the CPU runs the kernels under Triton's "
                                        "interpreter: run with TRITON_INTERPRET=1"} for c in CASES]
    else:
        report["kernels"] = check_kernels(dev, timing=dev.type == "cuda")
    if benchmark:
        log = io.StringIO()
        b = {"steps": steps if dev.type == "cuda" else 2, "paths": {}}
        try:
            with contextlib.redirect_stdout(log):
                res = pretrain_benchmark(str(dev), b["steps"], toy=dev.type != "cuda",
                                         compile=compile)
            for name, x in res.items():
                if not isinstance(x, dict) or "ms_per_step" not in x:
                    continue
                label = "plain PyTorch fp32" if x["backend"] == "reference" else (
                    "--amp" + (" --compile" if x["compile"] else ""))
                b["paths"][label] = {"ms_per_step": x["ms_per_step"], "peak_gib": x["peak_gib"],
                                     "shapes_per_s": x["shapes_per_s"],
                                     "projected_hours": projection(x["ms_per_step"])["hours"]}
        except Exception as e:  # noqa: BLE001  (reported in the verdict)
            b["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            b["log_tail"] = log.getvalue()[-3000:]
        report["benchmark"] = b
    report["verdict"] = verdict(report)
    report["ready"] = not report["verdict"]
    report["seconds"] = round(time.time() - t0, 1)
    _print_report(report, out)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqae.doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    ap.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    ap.add_argument("--no-benchmark", action="store_true", help="skip the pretraining benchmark")
    ap.add_argument("--steps", type=int, default=20, help="timed benchmark steps (GPU)")
    ap.add_argument("--no-compile", action="store_true",
                    help="benchmark --amp without --compile (when torch.compile is broken here)")
    args = ap.parse_args(argv)
    report = run(args.device, not args.no_benchmark, args.steps, not args.no_compile)
    if args.json:
        from pqae.log import write_json

        print(f"report: {write_json(args.json, report)}")
    return 0 if report["ready"] else 1


if __name__ == "__main__":
    sys.exit(main())
