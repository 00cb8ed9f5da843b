"""The kernels check themselves on first use (kernels/verify.py): one check per variant and
machine, the verdict cached on disk, a failed check (wrong output, compile or launch error)
falls back to the reference with one warning, and the cache survives what a shared machine
does to it. On a CPU the Triton path runs under TRITON_INTERPRET=1 (set by conftest), with
"cpu" added to kernels.TRITON_DEVICES to play a GPU machine in auto mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference as R
from kernels import verify

from conftest import DEV, corrupt_fps, small_pretrain_config

ROOT = Path(__file__).resolve().parents[1]


def cloud(B: int, N: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, N, 3, generator=torch.Generator().manual_seed(seed)).to(DEV)


SECOND_PROCESS = """
import json, sys, warnings, torch, kernels
from kernels import verify
kernels.TRITON_DEVICES.add(sys.argv[1])
views = [torch.rand(2, n, 3, generator=torch.Generator().manual_seed(n)).to(sys.argv[1])
         for n in (200, 180)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = kernels.group_views(views, 8, 8)
want = kernels.reference.group_views([v.cpu() for v in views], 8, 8)
print(json.dumps({"checks": verify.checks_run, "summary": verify.summary(),
                  "warnings": [str(w.message) for w in caught],
                  "equal": all(torch.equal(g.cpu(), w) for gv, wv in zip(got, want)
                               for g, w in zip(gv, wv))}))
"""


def second_process(cache: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SECOND_PROCESS, DEV.type], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_each_variant_is_checked_once_and_its_verdict_cached(fresh):
    views = [cloud(2, 200), cloud(2, 180, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", verify.KernelCheckWarning)
        got = kernels.group_views(views, 8, 8)
        assert verify.checks_run == 1
        kernels.group_views([cloud(2, 150, 2), cloud(2, 129, 3)], 5, 8)  # same variant
        assert verify.checks_run == 1
        kernels.group_views(views, 8, 16)  # another k: another kernel
        assert verify.checks_run == 2
    want = R.group_views([v.cpu() for v in views], 8, 8)
    assert all(torch.equal(g.cpu(), w) for gv, wv in zip(got, want) for g, w in zip(gv, wv))
    data = json.loads(verify.cache_file(str(DEV)).read_text())
    assert data["machine"]["source"] == verify.source_hash()
    assert data["machine"]["torch"] == torch.__version__
    key = "group[block=256,k=8,nj=8,chunked=0]"
    assert data["variants"][key]["ok"] is True and data["variants"][key]["error"] == 0.0
    assert len(data["variants"]) == 2
    # a second process reads the verdict and checks nothing
    out = second_process(fresh)
    assert out["checks"] == 0 and out["equal"] and out["warnings"] == []
    assert out["summary"]["variants"] == {f"{DEV.type} {key}": {"ok": True, "error": 0.0,
                                                                 "cached": True}}


def test_wrong_output_falls_back_to_the_reference_with_one_warning(fresh, monkeypatch):
    corrupt_fps(monkeypatch)
    views = [cloud(2, 200), cloud(2, 180, 1)]
    with pytest.warns(verify.KernelCheckWarning) as caught:
        got = kernels.group_views(views, 8, 8)
        again = kernels.group_views(views, 8, 8)
    assert len(caught) == 1
    msg = str(caught[0].message)
    for part in ("group[block=256,k=8,nj=8,chunked=0]", "failed its check", "max error",
                 f"Triton {verify.machine(str(DEV))['triton']}", f"torch {torch.__version__}",
                 str(verify.cache_file(str(DEV))), "PyTorch reference"):
        assert part in msg, (part, msg)
    want = R.group_views([v.cpu() for v in views], 8, 8)
    for out in (got, again):  # the reference's result, not the wrong kernel's
        assert all(torch.equal(g.cpu(), w) for gv, wv in zip(out, want) for g, w in zip(gv, wv))
    assert verify.checks_run == 1
    assert verify.summary()["fallback"] == ["group"]
    data = json.loads(verify.cache_file(str(DEV)).read_text())
    (verdict,) = data["variants"].values()
    assert verdict["ok"] is False and "max error" in verdict["detail"]
    assert "failed their check" in verify.header(DEV)
    # the next process reads the failed verdict: no check, the reference, one warning
    out = second_process(fresh)
    assert out["checks"] == 0 and out["equal"]
    assert out["summary"]["fallback"] == ["group"]
    assert [w for w in out["warnings"] if "failed its check" in w] == out["warnings"]
    assert len(out["warnings"]) == 1


def test_forced_triton_raises_instead_of_falling_back(fresh, monkeypatch):
    corrupt_fps(monkeypatch)
    kernels.set_backend("triton")
    with pytest.raises(verify.KernelCheckError, match=r"fps\[block=256\].*forbids falling back"):
        kernels.fps(cloud(2, 200), 8)


def test_compile_and_launch_errors_fall_back(fresh, monkeypatch):
    from kernels import triton_ops as T

    knn = T.knn

    def broken(*args):
        raise RuntimeError("simulated compile error")

    q, x = cloud(2, 7), cloud(2, 100, 1)
    monkeypatch.setattr(T, "knn", broken)  # the check itself cannot run the kernel
    with pytest.warns(verify.KernelCheckWarning, match="RuntimeError: simulated compile error"):
        assert torch.equal(kernels.knn(q, x, 5).cpu(), R.knn(q.cpu(), x.cpu(), 5))
    assert "simulated compile error" in verify.cache_file(str(DEV)).read_text()  # kept: it is
    verify.cache_file(str(DEV)).unlink()  # this machine's (here: a test's) doing
    verify.reset()
    monkeypatch.setattr(T, "knn", knn)
    assert verify.ensure(verify.spec("knn", 100, 5), DEV)  # passes its check ...
    monkeypatch.setattr(T, "knn", broken)  # ... then a launch fails
    with pytest.warns(verify.KernelCheckWarning, match="launch failed"):
        assert torch.equal(kernels.knn(q, x, 5).cpu(), R.knn(q.cpu(), x.cpu(), 5))
    assert verify.summary()["fallback"] == ["knn"]


def test_pretraining_with_a_wrong_kernel_trains_on_the_reference(fresh, monkeypatch, tmp_path):
    """The losses of a run whose FPS kernel is wrong equal the plain reference path's (its
    grouping fell back; the Chamfer loss still runs in Triton, equal to rounding), and the
    fallback is in results.json."""
    import pretrain

    def run(name: str) -> dict:
        cfg = small_pretrain_config(tmp_path / name, batch_size=4, procedural_shapes=8,
                                    num_points=128, num_group=8, group_size=8, max_steps=3)
        return pretrain.main(cfg)

    kernels.set_backend("reference")
    ref = run("reference")
    kernels.set_backend("auto")
    corrupt_fps(monkeypatch)
    with pytest.warns(verify.KernelCheckWarning, match="group.*failed its check"):
        got = run("wrong-fps")
    assert got["kernels"]["fallback"] == ["group"]
    saved = json.loads((tmp_path / "wrong-fps" / "run" / "results.json").read_text())
    assert saved["kernels"]["fallback"] == ["group"]
    assert any(k.endswith("chamfer_loss[fused,n=8,m=8,float32,float32,grad_b=0]") and v["ok"]
               for k, v in saved["kernels"]["variants"].items())  # the loss did run in Triton
    assert ref["kernels"] == {"requested": "reference", "fallback": [], "variants": {}}
    for a, b in zip(got["history"], ref["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len(got["history"]) == len(ref["history"]) >= 3


def test_an_unwritable_cache_checks_anyway_and_says_so_once(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # cache_dir() lies below a file
    with pytest.warns(verify.KernelCheckWarning) as caught:
        a = kernels.fps(cloud(2, 200), 8)
        kernels.fps(cloud(2, 20), 4)
    assert [str(w.message) for w in caught if "cannot write the verdict cache" in str(w.message)] \
        and len(caught) == 1
    assert verify.checks_run == 2 and torch.equal(a.cpu(), R.fps(cloud(2, 200).cpu(), 8))
    assert blocker.read_text() == ""


def test_a_corrupt_cache_file_is_ignored_and_rewritten(fresh):
    path = verify.cache_file(str(DEV))
    path.parent.mkdir(parents=True)
    path.write_text('{"variants": {"fps[block=256]": {"ok": tr')  # cut off mid-write
    with pytest.warns(verify.KernelCheckWarning, match="ignoring the unreadable verdict cache"):
        kernels.fps(cloud(2, 200), 8)
    assert verify.checks_run == 1
    assert json.loads(path.read_text())["variants"]["fps[block=256]"]["ok"] is True


WRITER = """
import sys, torch
from kernels import verify
for i in range(int(sys.argv[2])):
    verify._write_cache("cpu", f"{sys.argv[1]}-{i}", {"ok": True, "error": 0.0, "detail": "x" * 2000})
"""


def test_processes_writing_the_cache_at_once_keep_it_whole(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name, "40"], cwd=ROOT, env=env)
             for name in ("a", "b", "c")]
    verify_dir = tmp_path / "pqae" / "kernel-checks"
    reads = 0
    while any(p.poll() is None for p in procs):  # a reader never sees half a file
        for f in verify_dir.glob("*.json") if verify_dir.exists() else []:
            json.loads(f.read_text())
            reads += 1
        time.sleep(0.005)
    assert [p.returncode for p in procs] == [0, 0, 0]
    (f,) = verify_dir.glob("*.json")
    keys = set(json.loads(f.read_text())["variants"])
    assert keys == {f"{n}-{i}" for n in "abc" for i in range(40)}  # no merge was lost
    assert not list(verify_dir.glob("*.tmp")) and reads > 0


def test_header_and_summary_on_a_cpu_run():
    kernels.set_backend("auto")
    assert verify.header(torch.device("cpu")) == "kernels reference (cpu)"
    kernels.set_backend("reference")
    try:
        assert verify.header(torch.device("cuda")) == "kernels reference (PQAE_KERNELS=reference)"
    finally:
        kernels.set_backend("auto")
