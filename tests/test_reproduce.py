"""python -m pqae.reproduce: the tiny table end to end (pretraining, 4 tasks x 2 seeds), its
report checked against the runs' own results.json, a second invocation that runs nothing, a
killed run continued, a failed run reported without stopping the others."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from pqae import reproduce

SHRINK = ("pretrain.py=--max-steps 4 --procedural-shapes 64 --procedural-points 512",
          "finetune_cls.py=--epochs 2 --votes 1 --procedural-train 32 --procedural-test 16",
          "fewshot.py=--finetune.epochs 1",
          "partseg.py=--epochs 1 --procedural-shapes 16",
          "semseg.py=--epochs 1")


def _cfg(out: Path, **kw) -> reproduce.Config:
    return dataclasses.replace(reproduce.PRESETS["tiny"], out_dir=str(out), pretrain=True,
                               extra=SHRINK, **kw)


def _expected(task: str, results: dict) -> dict[tuple[str, str], list[float]]:
    """What a reader computes from one run's results.json, by hand."""
    if task.startswith("cls"):
        return {("acc", "test-selected epoch"): [results["best_acc"]],
                ("acc", "last epoch"): [results["last_acc"]],
                ("acc", "voting (last epoch)"): [results["vote_acc"]]}
    if task.startswith("partseg"):
        return {(m, sel): [results[key][m]] for m in ("class_miou", "instance_miou")
                for sel, key in (("test-selected epoch", "best_on_test"), ("last epoch", "last"))}
    if task.startswith("semseg"):
        return {("miou", "test-selected epoch"): [results["best_miou"]],
                ("miou", "last epoch"): [results["history"][-1]["miou"]]}
    return {(s, sel): [f[key] for f in folds] for s, folds in results["folds"].items()
            for sel, key in (("test-selected epoch", "best_acc"), ("last epoch", "last_acc"))}


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "runs"
    cwd = os.getcwd()
    os.chdir(out.parent)  # the runs' own relative paths (few-shot episodes) land there
    try:
        result = reproduce.main(_cfg(out))
    finally:
        os.chdir(cwd)
    return out, result


def test_the_tiny_table_reports_exactly_what_its_runs_wrote(tiny_table):
    out, result = tiny_table
    rep = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in rep["runs"]] == ["passed"] * 7
    assert (out / "pretrain" / "ckpt-final" / "model.safetensors").is_file()
    assert rep["pretraining"]["status"] == "passed" and rep["pretraining"]["seconds"] > 0
    assert rep["checkpoint"] == str(out / "pretrain" / "ckpt-final")
    by_hand: dict[tuple[str, str, str], list[float]] = {}
    for run in rep["runs"]:
        results = json.loads((Path(run["out_dir"]) / "results.json").read_text())
        assert f"--pretrained {out / 'pretrain' / 'ckpt-final'}" in run["command"]
        for (sub, sel), values in _expected(run["task"], results).items():
            by_hand.setdefault((run["task"], sub, sel), []).extend(values)
    reported = {(task, sub, sel): d for task, t in rep["tasks"].items()
                for sub, sels in t["metrics"].items() for sel, d in sels.items()}
    assert set(reported) == set(by_hand)
    for key, values in by_hand.items():
        d = reported[key]
        assert d["values"] == values and d["n"] == len(values) == 2, key
        assert d["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert d["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert (d["median"], d["min"], d["max"]) == (np.median(values), min(values), max(values))
    assert all(len(curve) == 2 for curve in rep["tasks"]["cls-tiny"]["curves"].values())
    md = (out / "report.md").read_text()
    assert "| acc | test-selected epoch | 2 |" in md and "## Runs" in md
    if rep["figures"] is not None:  # matplotlib installed ([plots], in the [test] extra)
        assert {"figures/distributions.png", "figures/curves-cls-tiny.png",
                "figures/fewshot-fewshot-tiny.png"} <= set(rep["figures"])
        assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in rep["figures"])


def test_a_second_invocation_runs_nothing_and_a_killed_run_continues(tiny_table, capsys):
    out, _ = tiny_table
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("*.log")}
    again = reproduce.main(_cfg(out))
    assert all(r.state == "done" for r in again["runs"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.log")} == logs
    # a run killed before it wrote results.json is continued with --resume
    (out / "cls-tiny" / "seed-1" / "results.json").unlink()
    plan = reproduce.plan(_cfg(out), True, str(out / "pretrain" / "ckpt-final"))
    assert [r.state for r in plan if r.task.name == "cls-tiny"] == ["done", "resume"]
    reproduce.main(_cfg(out, dry_run=True))
    shown = capsys.readouterr().out
    assert "1 to resume" in shown and "--seed 1 --epochs 2" in shown and "--resume" in shown
    rep = reproduce.main(_cfg(out))["report"]
    resumed = next(r for r in rep["runs"] if r["task"] == "cls-tiny" and r["seed"] == 1)
    assert resumed["status"] == "passed" and resumed["command"].endswith("--resume")


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, tiny_table):
    out, _ = tiny_table
    cfg = dataclasses.replace(_cfg(tmp_path / "runs", ckpt=str(out / "pretrain" / "ckpt-final"),
                                   tasks=("cls-tiny", "partseg-tiny"), seeds=1),
                              pretrain=False, extra=SHRINK + ("partseg.py=--no-such-flag",))
    with pytest.raises(SystemExit) as stop:
        reproduce.main(cfg)
    assert stop.value.code == 1
    rep = json.loads((tmp_path / "runs" / "report.json").read_text())
    status = {r["task"]: r["status"] for r in rep["runs"]}
    assert status == {"cls-tiny": "passed", "partseg-tiny": "failed"}
    failed = next(r for r in rep["runs"] if r["status"] == "failed")
    assert "no-such-flag" in failed["log_tail"]
    assert "partseg-tiny seed 0 failed: log tail" in (tmp_path / "runs" / "report.md").read_text()


def test_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pqae.reproduce", "--dry-run", "--ckpt", "x",
                        "--out-dir", str(tmp_path), "--heads", "linear"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "plan: 97 runs" in p.stdout  # (5 classification + 5 linear) x 8 + few-shot + 2 x 8
    assert "--preset scan-hardest --pretrained x" in p.stdout and "--head linear" in p.stdout
    assert "time unknown" in p.stdout and " 301 ep " in p.stdout and " 40x151 ep " in p.stdout
    p = subprocess.run([sys.executable, "-m", "pqae.reproduce", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "give --ckpt" in p.stdout + p.stderr


def test_a_validation_split_is_asked_of_classification_only_and_reported(tmp_path):
    cfg = dataclasses.replace(reproduce.PRESETS["tiny"], out_dir=str(tmp_path),
                              val_fraction=0.2)
    runs = reproduce.plan(cfg, True, "CKPT")
    asked = {r.task.name for r in runs if "--val-fraction" in r.argv}
    assert asked == {"cls-tiny"}
    sel = reproduce.selections(runs[0].task, {"best_acc": 90.0, "last_acc": 85.0,
                                              "val_selected_acc": 87.5})
    assert sel["acc"]["val-selected epoch"] == 87.5
    d = reproduce.distribution([87.5, 86.0, None], 89.6)
    assert d["n"] == 2 and d["paper_above"] == 2 and "above our best" in d["paper_position"]
