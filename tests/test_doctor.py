"""`python -m pqae.doctor`: on a CPU (as CI runs it) the machine, every kernel variant checked
under Triton's interpreter at toy sizes, the toy benchmark and a verdict; a second run reads
the verdicts from the cache; a wrong kernel, a missing C compiler or Python.h, or a missing
GPU each make it say what to fix."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import corrupt_fps
from pqae import doctor

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def _doctor(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop("PQAE_KERNELS", None)
    if torch.cuda.is_available():  # the CPU run, where the tests run on a GPU machine
        env["TRITON_INTERPRET"] = "1"
        args = ("--device", "cpu", *args)
    else:  # the doctor sets TRITON_INTERPRET itself where torch sees no GPU
        env.pop("TRITON_INTERPRET", None)
    out = tmp_path / f"doctor{len(list(tmp_path.glob('doctor*.json')))}.json"
    r = subprocess.run([sys.executable, "-m", "pqae.doctor", "--json", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(out.read_text())


def test_doctor_on_a_cpu_checks_every_kernel_then_reads_the_cache(tmp_path):
    r, rep = _doctor(tmp_path)
    assert rep["ready"] and rep["verdict"] == [] and rep["device"] == "cpu"
    m = rep["machine"]
    assert m["nproc_per_node"] == 1 and m["c_compiler"] and m["python_h"]
    assert m["kernel_cache"] == str(tmp_path / "cache" / "pqae" / "kernel-checks")
    assert {k["op"] for k in rep["kernels"]} == {"group", "fps", "knn", "chamfer_loss", "patch_max",
                                                 "point_mlp"}
    assert len(rep["kernels"]) == len(doctor.CASES)
    for k in rep["kernels"]:
        # (patch_max's and point_mlp's bf16 outputs are rounded to bf16: 2^-8 of their scale)
        assert k["ok"] and k["error"] is not None and k["error"] < (
            1e-2 if k["op"] in ("patch_max", "point_mlp") else 1e-5), k
        assert "triton_ms" not in k  # no speed figures from the interpreter
    # nothing was cached; a variant two scripts share is checked once
    seen = set()
    for k in rep["kernels"]:
        assert not k["cached"] and ("check_s" in k) == (k["variant"] not in seen), k
        seen.add(k["variant"])
    assert len(seen) < len(rep["kernels"])
    assert any("bfloat16" in k["variant"] for k in rep["kernels"])
    assert "speed figures need a GPU" in r.stdout and "verdict: ready" in r.stdout
    b = rep["benchmark"]
    assert "error" not in b, b.get("log_tail")
    assert set(b["paths"]) == {"plain PyTorch fp32", "--amp"}
    assert all(p["ms_per_step"] > 0 and p["projected_hours"] > 0 for p in b["paths"].values())

    # the next process pays nothing: every verdict comes from the cache
    r2, rep2 = _doctor(tmp_path, "--no-benchmark")
    assert rep2["ready"] and "benchmark" not in rep2
    assert all(k["ok"] and k["cached"] for k in rep2["kernels"])
    assert r2.stdout.count("(cached verdict)") == len(doctor.CASES)


def test_doctor_names_a_kernel_that_fails_its_check(fresh, monkeypatch):
    corrupt_fps(monkeypatch)
    cases = [c for c in doctor.CASES if c.op in ("fps", "knn")]
    monkeypatch.setattr(doctor, "CASES", cases)
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report says it; no warning besides
        rep = doctor.run(device="cpu", benchmark=False, out=out)
    assert not rep["ready"]
    bad = [k for k in rep["kernels"] if not k["ok"]]
    assert [k["op"] for k in bad] == ["fps"] and "FPS indices differ" in bad[0]["detail"]
    assert [k["ok"] for k in rep["kernels"] if k["op"] == "knn"] == [True]
    (fix,) = rep["verdict"]
    assert bad[0]["variant"] in fix and "PyTorch reference" in fix
    text = out.getvalue()
    assert "verdict: NOT READY" in text and f"FAILED {bad[0]['variant']}" in text


def test_machine_lists_a_missing_compiler_python_h_and_gpu(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    paths = dict(doctor.sysconfig.get_paths(), include="/nonexistent/include")
    monkeypatch.setattr(doctor.sysconfig, "get_paths", lambda: paths)
    m = doctor.machine(gpu_expected=True)
    assert m["c_compiler"] is None and m["python_h"] is None
    problems = " | ".join(m["problems"])
    assert "no C compiler" in problems and "/nonexistent/include/Python.h" in problems
    assert ("torch sees no CUDA device" in problems) == (not torch.cuda.is_available())
    assert doctor.verdict({"machine": m, "kernels": []}) == m["problems"]
    # a CPU build of torch on a machine without a GPU is not a problem by default
    if not torch.cuda.is_available():
        assert not any("CUDA device" in p for p in doctor.machine()["problems"])


BARE = """
import io, json, sys
class Missing:  # a machine with torch and Triton, and none of the package's other dependencies
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tyro", "safetensors", "h5py", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Missing())
from pqae import doctor
doctor.CASES = [c for c in doctor.CASES if c.op in ("chamfer_loss", "knn")]
rep = doctor.run(device="cpu", out=io.StringIO())
print(json.dumps(rep))
"""


def test_doctor_reports_on_a_bare_install(tmp_path):
    """Only torch and Triton installed: the machine and kernel checks still run; the benchmark,
    which needs the package's dependencies, is named as what failed."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", BARE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rep["kernels"]) == 3 and all(k["ok"] for k in rep["kernels"])
    assert not rep["ready"] and rep["benchmark"]["error"].startswith("ModuleNotFoundError")
    assert rep["verdict"] == [f"the pretraining benchmark failed ({rep['benchmark']['error']}): "
                              "install the package and its dependencies: pip install -e ."]


def test_timed_rows_carry_both_times(fresh, monkeypatch):
    """The GPU path of the kernel rows (on a CPU: wall time of the interpreter, which proves
    only that both paths run and are recorded)."""
    monkeypatch.setattr(doctor, "CASES", [c for c in doctor.CASES if c.op == "chamfer_loss"])
    rows = doctor.check_kernels(torch.device("cpu"), timing=True)
    assert len(rows) == 2 and all(r["ok"] and r["triton_ms"] > 0 and r["torch_ms"] > 0
                                  for r in rows)
    out = io.StringIO()
    doctor._print_report({"machine": doctor.machine(), "kernels": rows, "timed": True,
                          "verdict": []}, out)
    assert out.getvalue().count("| Triton ") == 2 and "verdict: ready\n" in out.getvalue()
