"""`.ci/gpu`, the one command a GPU session runs: its dry run (the same steps on the CPU at toy
sizes) passes and writes the report, and a failing step is reported with its log and makes the
command fail, so the script cannot rot between GPU sessions."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests", "doctor", "kernels.bench", "pretrain.benchmark", "cost-model", "pretrain.graph",
         "pretrain.fused_embed", "finetune.benchmark", "pretrain.host", "pretrain.real",
         "pretrain.resume", "probe", "kernels.static"]


def _script():
    """.ci/gpu as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("ci_gpu", str(ROOT / ".ci" / "gpu"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("ci_gpu", loader))
    loader.exec_module(module)
    return module


def _gpu_check(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    p = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu"), "--dry-run", "--out",
                        str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    return p.returncode, report, (tmp_path / "gpu-report.md").read_text()


def test_dry_run_passes_every_step_and_writes_the_report(tmp_path):
    rc, report, md = _gpu_check(tmp_path)
    assert rc == 0, [s for s in report["steps"] if s["status"] != "passed"]
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["dry_run"] and report["preflight"]["problems"] == []
    by = {s["name"]: s for s in report["steps"]}
    bench = by["pretrain.benchmark"]["figures"]
    assert set(bench) == {"plain PyTorch fp32", "this config"}
    assert all(v["ms_per_step"] > 0 for v in bench.values())
    assert set(by["finetune.benchmark"]["figures"]) == {"fps", "fast_point_all"}
    real = by["pretrain.real"]["figures"]
    assert real["losses"][-1] < 0.9 * real["losses"][0]  # the check the step made
    assert by["pretrain.resume"]["figures"]["steps"][-1] > real["steps"][-1]
    assert {r["op"] for r in by["kernels.bench"]["figures"]["rows"]} >= {"fps", "knn", "group (2 views)"}
    assert by["kernels.static"]["figures"]["rows"][0]["estimate_us"] > 0
    # the cost model's phases beside the measured ones (here: CPU time of the toy sizes)
    assert by["cost-model"]["figures"]["paths"]["amp_compile"]["step_ms"] > 0
    assert "| amp_compile | encoder |" in md and "| fp32_plain | step |" in md
    doc = by["doctor"]["figures"]
    assert doc["ready"] and len(doc["kernels"]) == 10 and all(k["ok"] for k in doc["kernels"])
    assert f"| {doc['kernels'][0]['variant']} | pretrain | ok (" in md
    assert by["probe"]["figures"]["embed_s"] > 0 and "probe (ModelNet40-sized)" in md
    graph = by["pretrain.graph"]["figures"]  # on a CPU the split step runs as is: no difference
    assert graph["max_loss_diff"] == 0
    assert set(graph["ms_per_step"]) == set(graph["finetune_ms_per_step"]) == {"eager", "graph"}
    assert "--cuda-graph (reference step, --amp --compile): eager" in md
    fused = by["pretrain.fused_embed"]["figures"]  # on a CPU: the op's reference path
    assert fused["max_loss_diff"] <= 0.05 * max(fused["losses"]["False"])  # the step's check
    assert fused["fallback"] == []
    assert set(fused["ms_per_step"]) == {"plain", "fused"}
    assert "--fused-embed (reference step, --amp --compile): plain" in md
    for name in STEPS:
        assert f"| {name} | passed |" in md
    # every path printed its timing as soon as it had it: what a step cut short still keeps
    log = (tmp_path / "gpu-check.log").read_text()
    timed = [m.group(1) for m in map(_script().PROGRESS.match, log.splitlines()) if m]
    # pretraining, --cuda-graph's steps (pretraining, fine-tuning) without and with the graph,
    # the pretraining step without and with --fused-embed, 2 fine-tunings
    both = ["plain PyTorch fp32", "this config"]
    assert timed == both + ["this config"] * 6 + both * 2


def test_a_failing_step_fails_the_check_with_its_log(tmp_path):
    """Resuming with no checkpoint fails; the report names the step and keeps its log tail."""
    rc, report, md = _gpu_check(tmp_path, "--only", "pretrain.resume")
    assert rc == 1 and report["failed"] == ["pretrain.resume"]
    (step,) = report["steps"]
    assert step["status"] == "failed" and "no complete checkpoint" in step["log_tail"]
    assert "## pretrain.resume: log tail" in md


def test_a_step_past_its_time_limit_is_stopped_and_reported(tmp_path, monkeypatch):
    """The budget caps each step: a step that cannot finish within it is killed there, reported
    as a timeout with what it had printed, and the check fails. (A step that sleeps stands in for
    a slow benchmark, so the test does not depend on how fast this machine is.)"""
    gpu = _script()
    code = "import time; print('started', flush=True); time.sleep(120)"
    monkeypatch.setattr(gpu, "steps", lambda dry, airplanes, work: [dict(
        name="pretrain.benchmark", cap=180, what="pretraining step",
        cmd=[sys.executable, "-c", code])])
    rc = gpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "8"])
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    (step,) = report["steps"]
    assert rc == 1 and report["failed"] == ["pretrain.benchmark"]
    assert step["status"] == "timeout" and step["cap_s"] <= 8 and step["seconds"] < 30
    assert "started" in step["log_tail"]


def test_a_benchmark_cut_short_keeps_the_paths_it_had_timed():
    """A benchmark killed at its time limit (a slow torch.compile, say) still reports the paths
    it had timed, from their progress lines, marked as cut short."""
    gpu = _script()
    lines = [gpu.RUN_MARK + "fps",
             "benchmark | plain PyTorch fp32 | 52.68 ms/step | 304 shapes/s | peak 1.50 GiB",
             "benchmark | this config | 9.10 ms/step | 3516 shapes/s | peak - GiB",
             gpu.RUN_MARK + "fast_point_all"]
    code = "import time\n" + "".join(f"print({x!r}, flush=True)\n" for x in lines) + \
        "time.sleep(60)"
    step = dict(name="finetune.benchmark", cap=5, what="fine-tuning step",
                cmd=[sys.executable, "-c", code])
    res = gpu.run_step(step, dict(os.environ), 100, lambda text: None)
    assert res["status"] == "timeout" and res["seconds"] < 30
    assert res["figures"] == {"fps": {
        "plain PyTorch fp32": {"ms_per_step": 52.68, "shapes_per_s": 304, "peak_gib": 1.5,
                               "partial": True},
        "this config": {"ms_per_step": 9.1, "shapes_per_s": 3516, "peak_gib": None,
                        "partial": True}}}
    table = "\n".join(gpu._figure_tables([res]))
    assert "| fps | this config (cut short: no phases) | 9.10 | 3516 | - |" in table
