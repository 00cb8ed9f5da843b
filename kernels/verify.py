"""The Triton kernels check themselves where they first run.

No test machine sees the user's GPU, driver, CUDA and Triton release. So the first time a
process takes the Triton path of an op with a given kernel *variant* (the compile-time
constants of its launches: block sizes, k, the number of points per set, the dtypes) on a
device, ``ensure`` runs that variant once on a small deterministic input built to hit the same
constants and the edge cases (duplicate points, exact distance ties on a quantised cloud,
points at and near the origin for FPS, set sizes that are not a multiple of 16, bf16 for the
Chamfer loss) and compares it with ``kernels/reference.py``:

* FPS and kNN indices must be identical, grouped coordinates and Chamfer values equal to 1e-5
  of their scale, gradients to 1e-4 (1e-2 for bf16/fp16 gradients, which are rounded to 8 bits);
* the verdict is kept for the process and written to a small JSON file per machine in
  ``$XDG_CACHE_HOME/pqae/kernel-checks`` (else ``~/.cache/pqae/kernel-checks``), named by the
  GPU, compute capability, driver, torch, Triton and a hash of the kernels' source, so later
  processes read it and pay nothing. Writes are atomic (a temporary file, then a rename); a
  corrupt file is ignored and rewritten; an unwritable directory means checking every process
  (said once).

A failed verdict (a mismatch, a compile error, a launch error) sends the op to the reference
for the rest of the process with one warning per op on rank 0 naming the kernel variant, the
versions, the size of the mismatch and the verdict's file. With ``PQAE_KERNELS=triton`` a
failed verdict raises ``KernelCheckError`` instead. ``summary()`` is what a run records in its
header and ``results.json``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import reference

SOURCES = ("triton_ops.py", "reference.py", "verify.py")  # what a verdict depends on
_TOL = {"value": 1e-5, "grad": 1e-4, "grad_low": 1e-2}


class KernelCheckWarning(RuntimeWarning):
    """A Triton kernel variant failed its check on this machine; the op uses the reference."""


class KernelCheckError(RuntimeError):
    """A Triton kernel variant failed its check while PQAE_KERNELS=triton forbids falling back."""


class Spec(NamedTuple):
    """One kernel variant: its key (what decides the compiled code) and its check."""
    op: str
    key: str
    probe: Callable[[torch.device], tuple[bool, float, str]]  # -> (passed, worst error, detail)


# ----------------------------------------------------------------------------- machine identity
@functools.lru_cache(None)
def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(None)
def driver_version() -> str | None:
    """The NVIDIA driver's version (NVML), else the CUDA version the driver supports, else None."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buf = ctypes.create_string_buffer(96)
            if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
                return buf.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"CUDA {v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


@functools.lru_cache(None)
def machine(device: str) -> dict:
    """What a verdict holds for: GPU, compute capability, driver, torch, Triton, source hash."""
    import triton

    dev = torch.device(device)
    if dev.type == "cuda":
        i = dev.index if dev.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(i)
        cap = "sm_%d%d" % torch.cuda.get_device_capability(i)
        driver = driver_version()
    else:
        gpu, cap, driver = f"{dev.type} (Triton interpreter)", "interpreter", None
    return {"gpu": gpu, "capability": cap, "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "source": source_hash()}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pqae" / "kernel-checks"


def cache_file(device: str) -> Path:
    m = machine(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{m['gpu']}-{m['capability']}").strip("-").lower()
    digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{slug}-{digest}.json"


# ----------------------------------------------------------------------------- state
_verdicts: dict[tuple[str, str], dict] = {}  # (device, variant key) -> verdict
_warned: set[str] = set()  # ops whose fallback was announced
_said: set[str] = set()  # one-time notes (cache unwritable / corrupt)
checks_run = 0  # checks this process ran (not read from the cache)


def reset() -> None:
    """Forget every verdict of this process (tests; the disk cache stays)."""
    global checks_run
    _verdicts.clear()
    _warned.clear()
    _said.clear()
    checks_run = 0


def _rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _note(tag: str, text: str) -> None:
    if tag not in _said:
        _said.add(tag)
        if _rank0():
            warnings.warn(text, KernelCheckWarning, stacklevel=4)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
            raise ValueError("no 'variants' object")
        return data
    except (FileNotFoundError, NotADirectoryError):  # nothing cached (yet)
        return {}
    except (OSError, ValueError) as e:
        _note("corrupt", f"pqae kernels: ignoring the unreadable verdict cache {path} ({e}); "
                         "it is rewritten")
        return {}


def _write_cache(device: str, key: str, verdict: dict) -> None:
    """Merge one verdict into the machine's cache file, atomically; an unwritable cache
    directory is said once and otherwise ignored (the check still protects this process)."""
    path = cache_file(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):  # the merge is not lost to another process's write
            data = _read_cache(path) or {"machine": machine(device), "variants": {}}
            data["variants"][key] = verdict
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # readers see the old file or the new one, never half
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as e:
        _note("unwritable", f"pqae kernels: cannot write the verdict cache in {path.parent} ({e}):"
                            " each process checks the kernels again (a second each); set "
                            "XDG_CACHE_HOME to a writable folder to keep the verdicts")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on path + '.lock' (POSIX; elsewhere the rename alone keeps the file
    whole, and a concurrent merge may drop a verdict, which is then checked again)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- the check
def verdict(spec: Spec, device: torch.device) -> dict | None:
    """This process's verdict of the variant on `device` (ok, error, detail, from_cache), once
    ensure() has given it; else None."""
    return _verdicts.get((str(device), spec.key))


def ensure(spec: Spec | None, device: torch.device, forced: bool = False) -> bool:
    """Whether the Triton path of this variant may run on `device`: its verdict from this
    process, else from the machine's cache file, else from running its check now."""
    if spec is None or device.type == "meta":  # no Triton launch, or nothing is computed
        return True
    dev = str(device)
    v = _verdicts.get((dev, spec.key))
    if v is None:
        v = _read_cache(cache_file(dev)).get("variants", {}).get(spec.key)
        if not (isinstance(v, dict) and isinstance(v.get("ok"), bool)):
            v = run_check(spec, device)
            _write_cache(dev, spec.key, v)
        else:
            v = {**v, "from_cache": True}
        _verdicts[(dev, spec.key)] = v
    if v["ok"]:
        return True
    msg = _failure(spec, dev, v)
    if forced:
        raise KernelCheckError(msg + " (PQAE_KERNELS=triton forbids falling back)")
    if spec.op not in _warned:
        _warned.add(spec.op)
        if _rank0():
            warnings.warn(msg, KernelCheckWarning, stacklevel=3)
    return False


def run_check(spec: Spec, device: torch.device) -> dict:
    """Run one variant's check: {'ok', 'error' (the worst relative error, or the fraction of
    indices that differ), 'detail', 'seconds', 'checked'}."""
    global checks_run
    checks_run += 1
    t0 = time.perf_counter()
    try:
        ok, err, detail = spec.probe(device)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # a compile or launch error is a failed verdict, not a crash
        ok, err, detail = False, None, f"{type(e).__name__}: {str(e).strip()[:300]}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if err is not None and not err < float("inf"):  # NaN or inf in the output: JSON has no inf
        err = None
    return {"ok": ok, "error": err, "detail": detail, "seconds": round(time.perf_counter() - t0, 3),
            "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}


def launch_failed(spec: Spec | None, device: torch.device, exc: Exception) -> None:
    """A launch of a verified variant raised: the op uses the reference for the rest of the
    process (not cached: the cause may be of this run only)."""
    if spec is None:
        raise exc
    v = {"ok": False, "error": None, "detail": f"launch failed: {type(exc).__name__}: "
         f"{str(exc).strip()[:300]}", "seconds": 0.0}
    _verdicts[(str(device), spec.key)] = v
    if spec.op not in _warned:
        _warned.add(spec.op)
        if _rank0():
            warnings.warn(_failure(spec, str(device), v), KernelCheckWarning, stacklevel=3)


def _failure(spec: Spec, dev: str, v: dict) -> str:
    m = machine(dev)
    return (f"pqae kernels: the Triton kernel {spec.key} failed its check on {m['gpu']} "
            f"({m['capability']}, driver {m['driver'] or '-'}, torch {m['torch']}, Triton "
            f"{m['triton']}): {v['detail']}; {spec.op} uses the PyTorch reference for the rest of "
            f"this process (slower, correct). Verdict: {cache_file(dev)}. Run python -m "
            "pqae.doctor and include its output in a bug report.")


def summary() -> dict:
    """What a run records: the requested path and every variant's verdict in this process."""
    from . import get_backend

    out = {"requested": get_backend(), "fallback": sorted(_warned), "variants": {}}
    for (dev, key), v in sorted(_verdicts.items()):
        out["variants"][f"{dev} {key}"] = {"ok": v["ok"], "error": v["error"],
                                           "cached": bool(v.get("from_cache"))}
    return out


def header(device: torch.device) -> str:
    """The kernel path as the run header says it."""
    from . import TRITON_DEVICES, get_backend

    be = get_backend()
    if be == "reference" or (be == "auto" and device.type not in TRITON_DEVICES):
        return f"kernels reference ({'PQAE_KERNELS=reference' if be == 'reference' else device.type})"
    known = _read_cache(cache_file(str(device))).get("variants", {})
    bad = sorted(k for k, v in known.items() if isinstance(v, dict) and v.get("ok") is False)
    state = (f"{len(bad)} variant(s) failed their check here and use the reference: "
             f"{', '.join(bad)}" if bad else f"{len(known)} variant(s) verified here before, "
             "others are checked on first use")
    return f"kernels triton ({be}; {state}; {cache_file(str(device))})"


# ----------------------------------------------------------------------------- inputs
def _cloud(B: int, N: int, seed: int, device) -> torch.Tensor:
    """(B, N, 3) float32: cloud 0 Gaussian, the others quantised to a 0.25 grid (many exactly
    equal distances); in every cloud a point at the origin, one at squared norm 3e-4 (below FPS's
    1e-3 threshold) and two duplicates of point 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 3, generator=g) * 0.6
    x[1:] = torch.round(x[1:] * 4) / 4
    for i, p in ((3, 0.0), (4, 0.01)):
        if N > i + 1:
            x[:, i] = p
    for i in (6, 9):
        if N > i:
            x[:, i] = x[:, 2]
    return x.to(device)


def _np2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _probe_size(n: int, lo: int, at_least: int = 1) -> int:
    """A size with the same power-of-two block as n (blocks of at least `lo`): n itself up to
    `lo`, else half the block + 3 (not a multiple of 16), at least `at_least`."""
    return n if n <= lo else max(_np2(n) // 2 + 3, at_least)


def _index_err(name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float, str]:
    bad = int((got.cpu() != want.cpu()).sum())
    return bad == 0, bad / want.numel(), f"{bad} of {want.numel()} {name} differ"


def _value_err(name: str, got: torch.Tensor, want: torch.Tensor,
               tol: float) -> tuple[bool, float, str]:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if not bool(torch.isfinite(got).all()):
        err = float("inf")
    return err <= tol, err, f"{name} max error {err:.2e} (tolerance {tol:.0e})"


def _worst(*results: tuple[bool, float, str]) -> tuple[bool, float, str]:
    """All passed?, and the first failure (else the largest error) with its detail."""
    first = min(results, key=lambda r: (r[0], -r[1]))
    return all(r[0] for r in results), first[1], first[2]


# ----------------------------------------------------------------------------- variants
def spec(op: str, *shape) -> Spec | None:
    """The variant the Triton path of `op` launches for these sizes (see each case), or None
    when it launches no Triton kernel (it falls back to the reference by itself)."""
    from . import triton_ops as T

    if op == "fps":
        (n,) = shape
        if n > T.FPS_MAX_N:
            return None
        block = T._fps_block(n)
        return Spec(op, f"fps[block={block}]", lambda d: _probe_fps(d, _probe_size(n, 32)))
    if op == "knn":
        n, k = shape
        if k > T.KNN_MAX_K:
            return None
        nj, c, chunked = T._knn_cfg(n, k)
        size = 1024 + 37 if chunked else _probe_size(n, 32, k)
        return Spec(op, f"knn[k={k},nj={nj},chunked={int(chunked)}]",
                    lambda d: _probe_knn(d, size, k))
    if op == "group":
        ns, g, k = shape
        n = max(ns)
        if n > T.FPS_MAX_N or k > T.KNN_MAX_K:
            return None
        nj, c, chunked = T._knn_cfg(n, k)
        size = _probe_size(n, 32, k)
        return Spec(op, f"group[block={T._fps_block(n)},k={k},nj={nj},chunked={int(chunked)}]",
                    lambda d: _probe_group(d, size, min(g, 5), k))  # odd: see _probe_knn
    if op == "chamfer":
        n, m = shape
        if n <= T._CD_PAIR_MAX and m <= T._CD_PAIR_MAX:
            key = f"chamfer[pair,a={max(16, _np2(n))},b={max(16, _np2(m))}]"
            sizes = (_probe_size(n, 16), _probe_size(m, 16))
        else:
            cls = [min(64, max(16, _np2(x))) for x in (n, m)]
            key = f"chamfer[tiled,a={cls[0]},b={cls[1]}]"
            sizes = tuple(64 + 37 if x > 64 else _probe_size(x, 16) for x in (n, m))
        return Spec(op, key, lambda d: _probe_chamfer(d, *sizes))
    if op == "chamfer_loss":
        n, m, da, db, grad_b = shape
        fused = max(n, m) <= T.CD_LOSS_MAX
        key = (f"chamfer_loss[{'fused' if fused else 'tiled'},n={n},m={m},"
               f"{str(da).replace('torch.', '')},{str(db).replace('torch.', '')},"
               f"grad_b={int(grad_b)}]")
        return Spec(op, key, lambda d: _probe_chamfer_loss(d, n, m, da, db, grad_b))
    if op == "patch_max":
        m, dtype, has_bias, c, k, bn_relu = shape
        if m > T.PATCH_MAX_M:
            return None
        pb = T._pm_tile(m, T._PM_ROWS)[1]
        key = (f"patch_max[m={m},{str(dtype).replace('torch.', '')},bias={int(has_bias)},"
               f"c={min(128, _np2(c))},k={min(128, _np2(k))},bn_relu={int(bn_relu)}]")
        sizes = (_probe_size(c, 16), _probe_size(k, 16))
        return Spec(op, key, lambda d: _probe_patch_max(d, 2 * pb + 1, m, *sizes, dtype, has_bias,
                                                        bn_relu))
    if op == "point_mlp":
        m, dtype, k0, h, c = shape
        if m > T.PATCH_MAX_M:
            return None
        pb = T._pm_tile(m, T._MLP_ROWS)[1]
        key = (f"point_mlp[m={m},{str(dtype).replace('torch.', '')},k0={k0},"
               f"h={min(128, _np2(h))},c={min(128, _np2(c))}]")
        sizes = (_probe_size(h, 16), _probe_size(c, 16))
        return Spec(op, key, lambda d: _probe_point_mlp(d, 2 * pb + 1, m, k0, *sizes, dtype))
    raise ValueError(f"unknown op {op!r}")


def _probe_fps(device, n: int) -> tuple[float, str]:
    from . import triton_ops as T

    x = _cloud(2, n, 0, device)
    m = min(n, 12)
    return _index_err("FPS indices", T.fps(x, m), reference.fps(x.cpu(), m))


def _probe_knn(device, n: int, k: int) -> tuple[float, str]:
    from . import triton_ops as T

    x = _cloud(2, n, 1, device)
    # exact hits (distance 0) and others; 7 queries, so that the last of the programs (two
    # queries each) holds one
    q = torch.cat([x[:, :4], _cloud(2, 3, 2, device)], 1)
    return _index_err("kNN indices", T.knn(q, x, k), reference.knn(q.cpu(), x.cpu(), k))


def _probe_group(device, n: int, g: int, k: int) -> tuple[float, str]:
    from . import triton_ops as T

    views = [_cloud(2, n, 3, device), _cloud(2, max(k, g, n - 2), 4, device)]
    got = T.group_views(views, g, k)
    want = reference.group_views([v.cpu() for v in views], g, k)
    return _worst(*(_value_err(f"view {i} {what}", a, b, _TOL["value"])
                    for i, (gv, wv) in enumerate(zip(got, want))
                    for what, a, b in (("neighbourhood", gv[0], wv[0]), ("centres", gv[1], wv[1]))))


def _probe_chamfer(device, n: int, m: int) -> tuple[float, str]:
    from . import triton_ops as T

    a0, b0 = _cloud(3, n, 5, "cpu"), _cloud(3, m, 6, "cpu")
    b0[:, 1] = b0[:, 0]  # two equally near points for every a near b0[:, 0]
    a0[:, 0] = b0[:, 0]  # a point that coincides with one of the other set
    w = torch.rand(2, 3, max(n, m), generator=torch.Generator().manual_seed(7))
    res = []
    for name, fn, dev in (("triton", T.chamfer_l2, device), ("reference", reference.chamfer_l2, "cpu")):
        a = a0.to(dev).requires_grad_(True)
        b = b0.to(dev).requires_grad_(True)
        da, db = fn(a, b)
        ((da * w[0, :, :n].to(dev)).sum() + (db * w[1, :, :m].to(dev)).sum()).backward()
        res.append((da, db, a.grad, b.grad))
    (da, db, ga, gb), (ra, rb, rga, rgb) = res
    return _worst(_value_err("d_a", da, ra, _TOL["value"]), _value_err("d_b", db, rb, _TOL["value"]),
                  _value_err("grad a", ga, rga, _TOL["grad"]),
                  _value_err("grad b", gb, rgb, _TOL["grad"]))


def _probe_chamfer_loss(device, n: int, m: int, da, db, grad_b: bool) -> tuple[float, str]:
    from . import triton_ops as T

    low = {torch.bfloat16, torch.float16}
    pairs = []
    for v in range(2):
        a, b = _cloud(3, n, 8 + v, "cpu"), _cloud(3, m, 10 + v, "cpu")
        b[:, 1] = b[:, 0]
        a[:, 0] = b[:, 0]
        pairs.append((a.to(da), b.to(db)))
    res = []
    for fn, dev in ((T.chamfer_l2_loss, device), (reference.chamfer_l2_loss, "cpu")):
        a = [p[0].to(dev).requires_grad_(True) for p in pairs]
        b = [p[1].to(dev).requires_grad_(grad_b) for p in pairs]
        losses = fn(a, b)
        (losses[0] + 0.5 * losses[1]).backward()
        res.append((losses, a, b))
    (got, ga, gb), (want, wa, wb) = res
    checks = [_value_err(f"loss {v}", got[v], want[v], _TOL["value"]) for v in range(2)]
    checks += [_value_err(f"grad pred {v}", ga[v].grad, wa[v].grad,
                          _TOL["grad_low" if da in low else "grad"]) for v in range(2)]
    if grad_b:
        checks += [_value_err(f"grad target {v}", gb[v].grad, wb[v].grad,
                              _TOL["grad_low" if db in low else "grad"]) for v in range(2)]
    return _worst(*checks)


def _probe_patch_max(device, p: int, m: int, c: int, k: int, dtype, has_bias: bool,
                     bn_relu: bool) -> tuple[bool, float, str]:
    """linear + patch max over p patches (the last tile partly full), forward and backward,
    against the reference in float32 from the same (rounded) inputs; patch 1 repeats one
    point, so that every channel ties and its first row must win. With the BatchNorm + ReLU
    prologue the inputs lie on grids that keep y * scale + shift exact and off zero (no
    rounding can move a point across the ReLU)."""
    from . import triton_ops as T

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(p * m, k, generator=gen)
    x[m:2 * m] = x[m]
    w = torch.randn(c, k, generator=gen) * k ** -0.5
    b = torch.randn(c, generator=gen) if has_bias else None
    g = torch.randn(p, c, generator=gen)
    bn = None
    if bn_relu:
        x = torch.round(x * 4) / 4
        add = torch.round(torch.randn(p, k, generator=gen) * 4) / 4
        scale = 2.0 ** torch.randint(-1, 2, (k,), generator=gen).float()
        shift = torch.round(torch.randn(k, generator=gen) * 4) / 8 + 1 / 16
        bn = (add.to(dtype), scale, shift)
    x, w, g = x.to(dtype), w.to(dtype), g.to(dtype)
    b = None if b is None else b.to(dtype)
    dev = [t if t is None else t.to(device) for t in (x, w, b, g)]
    bn_dev = None if bn is None else tuple(t.to(device) for t in bn)
    out, idx = T.patch_max_fwd(*dev[:3], m, bn_dev)
    grads = T.patch_max_bwd(dev[3], idx, dev[0], dev[1], m, (True, True, has_bias), bn_dev)
    x32, w32, g32 = x.float(), w.float(), g.float()
    b32 = None if b is None else b.float()
    bn32 = None if bn is None else (bn[0].float(), bn[1], bn[2])
    want, _ = reference.patch_max_fwd(x32, w32, b32, m, bn32)
    a32 = x32 if bn is None else reference.bn_relu(x32, m, *bn32)[1]
    y = torch.nn.functional.linear(a32, w32, b32).reshape(p, m, c)
    idx = idx.long().cpu()
    low = dtype in (torch.bfloat16, torch.float16)
    tol, gtol = (_TOL["grad_low"], _TOL["grad_low"]) if low else (_TOL["value"], _TOL["grad"])
    checks = [_value_err("max", out, want, tol),
              _value_err("value at the argmax", y.gather(1, idx[:, None]).squeeze(1), want, tol),
              _index_err("argmax of the repeated point", idx[1], torch.zeros_like(idx[1]))]
    ref = reference.patch_max_bwd(g32, idx, x32, w32, m, (True, True, has_bias), bn32)
    names = ("x", "weight", "bias", "add", "scale", "shift")
    checks += [_value_err(f"grad {name}", got, r, gtol)
               for name, got, r in zip(names, grads, ref) if r is not None]
    return _worst(*checks)


def _probe_point_mlp(device, p: int, m: int, k0: int, h: int, c: int,
                     dtype) -> tuple[bool, float, str]:
    """point_mlp over p patches (the last tile partly full), forward and backward, against the
    reference in float32 from the same (rounded) inputs. The points and the first layer lie on
    grids that keep its output and the affine exact and off zero (no rounding can move a point
    across the ReLU); patch 1 repeats one point, so that every channel ties and its first row
    must win."""
    from . import triton_ops as T

    gen = torch.Generator().manual_seed(13)
    grid = lambda *shape: torch.round(torch.randn(*shape, generator=gen) * 4) / 4  # noqa: E731
    x, w1, b1 = grid(p * m, k0), grid(h, k0), grid(h) / 4
    x[m:2 * m] = x[m]
    scale = 2.0 ** torch.randint(-1, 2, (h,), generator=gen).float()
    shift = grid(h) / 4 + 1 / 64
    w2 = (torch.randn(c, h, generator=gen) * h ** -0.5).to(dtype)
    b2 = torch.randn(c, generator=gen).to(dtype)
    gy = torch.randn(p * m, c, generator=gen).to(dtype)
    g = torch.randn(p, c, generator=gen).to(dtype)
    dev = [t.to(device) for t in (x, w1, b1, scale, shift)]
    y, out, idx = T.point_mlp_fwd(*dev, w2.to(device), b2.to(device), m)
    grads = T.point_mlp_bwd(gy.to(device), g.to(device), idx, *dev, w2.to(device), m)
    first = (x, w1, b1, scale, shift)
    want_y, want, _ = reference.point_mlp_fwd(*first, w2.float(), b2.float(), m)
    idx = idx.long().cpu()
    low = dtype in (torch.bfloat16, torch.float16)
    tol, gtol = (_TOL["grad_low"], _TOL["grad_low"]) if low else (_TOL["value"], _TOL["grad"])
    checks = [_value_err("y", y, want_y, tol), _value_err("max", out, want, tol),
              _value_err("value at the argmax", y.float().cpu().reshape(p, m, c).gather(
                  1, idx[:, None]).squeeze(1), out, 0.0),
              _index_err("argmax of the repeated point", idx[1], torch.zeros_like(idx[1]))]
    ref = reference.point_mlp_bwd(gy.float(), g.float(), idx, *first, w2.float(), m)
    checks += [_value_err(name, got, r, gtol)
               for name, got, r in zip(("grad w2, b2", "first layer's sums"), grads, ref)]
    return _worst(*checks)
