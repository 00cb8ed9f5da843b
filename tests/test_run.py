"""The run skeleton every training script shares (`pqae.run`): a run cut short before its first
evaluation, the resume note, one vocabulary, and what the scripts may import."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import fewshot
import finetune_cls
import partseg
import pretrain
import semseg
from conftest import ROOT, small_pretrain_config

# Each task's tiny preset, made smaller still; max_steps stops it before epoch 0 ends.
CUT_SHORT = {
    "finetune_cls.py": lambda tmp: dataclasses.replace(
        finetune_cls.PRESETS["tiny"], max_steps=1, votes=1, procedural_train=32,
        procedural_test=8, out_dir=str(tmp)),
    "partseg.py": lambda tmp: dataclasses.replace(
        partseg.PRESETS["tiny"], max_steps=1, procedural_shapes=16, out_dir=str(tmp)),
    "semseg.py": lambda tmp: dataclasses.replace(
        semseg.PRESETS["tiny"], max_steps=1, out_dir=str(tmp)),
    "fewshot.py": lambda tmp: dataclasses.replace(
        fewshot.PRESETS["tiny"], folds=(0,), out_dir=str(tmp), data_dir=str(tmp / "episodes"),
        finetune=dataclasses.replace(fewshot.PRESETS["tiny"].finetune, max_steps=1)),
}
MODULES = {"finetune_cls.py": finetune_cls, "partseg.py": partseg, "semseg.py": semseg,
           "fewshot.py": fewshot}


@pytest.mark.parametrize("script", list(CUT_SHORT))
def test_a_run_stopped_before_its_first_evaluation_says_so(script, tmp_path, capsys):
    """--max-steps ends a run before any evaluation: it says so instead of crashing on a score
    it does not have, and still writes results.json."""
    MODULES[script].main(CUT_SHORT[script](tmp_path / "run"))
    out = capsys.readouterr().out
    done = out[out.rindex("done | "):]
    assert "no evaluation" in out and "stopped at step 1" in out, out[-2000:]
    assert "Traceback" not in out
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    if script == "fewshot.py":
        assert result["settings"]["5way_10shot"]["unevaluated_folds"] == [0]
        assert result["settings"]["5way_10shot"]["folds"] == []
        assert "left out" in result["table"] and "results" in done
    else:
        assert result["step"] == 1 and "no evaluation" in done
        assert "checkpoint" in done and "ckpt-last" in done  # no best: the last one is named
    if script == "semseg.py":  # classes absent from the training rooms have no weight
        weights = next(line for line in out.splitlines() if line.startswith("class weights"))
        assert "absent" in weights and "inf" not in weights


def test_resume_names_only_the_fields_that_changed(tmp_path, capsys):
    cfg = small_pretrain_config(tmp_path, max_steps=2, epochs=1, warmup_epochs=0)
    pretrain.main(cfg)
    capsys.readouterr()
    pretrain.main(dataclasses.replace(cfg, max_steps=4, resume=True))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resumed from"))
    assert line.endswith("at step 2; config changed since: {'max_steps': (2, 4)}"), line


def test_resume_without_changes_says_nothing_more(tmp_path, capsys):
    cfg = small_pretrain_config(tmp_path, max_steps=2, epochs=1, warmup_epochs=0)
    pretrain.main(cfg)
    capsys.readouterr()
    first = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    pretrain.main(dataclasses.replace(cfg, resume=True))  # the run is complete: no step runs
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("resumed from"))
    assert line.endswith("at step 2"), line
    # The last logged losses come back from the checkpoint: the run still reports them.
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"] == first
    assert f"done | loss {first['loss']:.4f}" in out


def test_every_run_writes_an_atomic_config_it_can_be_repeated_from(tmp_path):
    cfg = small_pretrain_config(tmp_path, max_steps=1)
    pretrain.main(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert not list((tmp_path / "run").glob("config.json.tmp*"))


def test_probe_help_names_its_command():
    proc = subprocess.run([sys.executable, "-m", "pqae.probe", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m pqae.probe")
    assert "presets" not in proc.stdout  # one set of defaults: nothing to choose from


def non_test_sources():
    for folder in ("pqae", "kernels", "data_prep"):
        yield from sorted((ROOT / folder).glob("*.py"))
    yield from (ROOT / f"{name}.py" for name in
                ("pretrain", "finetune_cls", "fewshot", "partseg", "semseg"))
    yield ROOT / ".ci" / "gpu"


def test_training_never_imports_the_offline_converters():
    """The scripts and the package run without data_prep: it only writes data files."""
    for path in non_test_sources():
        if path.parent.name in ("data_prep", ".ci"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "data_prep" for n in names), (path, names)


def test_comments_explain_instead_of_citing_a_document_the_reader_lacks():
    for path in non_test_sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert "§" not in line and "SPEC" not in line, f"{path}:{i}: {line.strip()}"


def test_micro_batches_hold_the_all_reduce_back_until_the_last():
    """DDP all-reduces gradients when a backward ends outside no_sync: the first K-1
    micro-batches run inside it, the last outside; the slices cover the batch once."""
    import contextlib
    from pqae.run import micro_batches

    class FakeDDP:
        entered = 0

        @contextlib.contextmanager
        def no_sync(self):
            FakeDDP.entered += 1
            yield

    ddp, parts = FakeDDP(), []
    for part, sync in micro_batches(ddp, 3, 12):
        with sync:
            parts.append(part)
    assert FakeDDP.entered == 2
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 12)]
    assert [(p.start, p.stop) for p, _ in micro_batches(object(), 1, 12)] == [(0, 12)]

