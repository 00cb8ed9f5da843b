"""The README's path from pretraining to every downstream task, through the real entry points.

The commands are read from the README's chain block and run in order, in a fresh directory,
as a new user would run them: no architecture flag anywhere, each downstream task given the
pretraining checkpoint, then the saved models evaluated from their checkpoints alone. Each
command gets a few extra flags that only shrink the run (steps, epochs, data sizes), so that
CI stays fast; the README's own timings are for the commands as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Flags that make each command small; none of them names the architecture.
SHRINK = {
    "pretrain.py": ["--procedural-shapes", "64", "--procedural-points", "512", "--max-steps", "4"],
    "finetune_cls.py": ["--epochs", "1", "--procedural-train", "32", "--procedural-test", "16",
                        "--votes", "1"],
    "fewshot.py": ["--folds", "0", "--finetune.epochs", "1"],
    "partseg.py": ["--epochs", "1", "--synthetic-shapes", "16"],
    "semseg.py": ["--epochs", "1"],
}


def readme_chain() -> list[list[str]]:
    """The commands of the README's chain block (after its `<!-- chain` marker)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- chain"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "python" and argv[1] in SHRINK, argv
    cmd = [sys.executable, str(ROOT / argv[1]), *argv[2:], *SHRINK[argv[1]]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_readme_chain_runs_as_written(tmp_path):
    commands = readme_chain()
    scripts = [c[1] for c in commands]
    assert scripts[:5] == ["pretrain.py", "finetune_cls.py", "fewshot.py", "partseg.py",
                           "semseg.py"], scripts
    assert any("--eval-ckpt" in c for c in commands)
    architecture = {"--dim", "--depth", "--heads", "--embed-hidden"}
    for argv in commands:
        assert not architecture & set(argv), argv
        proc = run(argv, tmp_path)
        assert proc.returncode == 0, (argv, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        # Every run ends by saying what it made.
        tail = proc.stdout[proc.stdout.rindex("done | "):]
        assert "results" in tail, tail
    runs = tmp_path / "runs"
    for name in ("pretrain-tiny", "finetune-cls-tiny", "fewshot-tiny", "partseg-tiny", "semseg-tiny"):
        result = json.loads((runs / name / "results.json").read_text())
        assert "config" in result, name
    assert (runs / "pretrain-tiny" / "ckpt-final" / "model.safetensors").is_file()
    finetune = json.loads((runs / "finetune-cls-tiny" / "results.json").read_text())
    assert finetune["config"]["pretrained"] == "runs/pretrain-tiny/ckpt-final"
    assert finetune["best_acc"] is not None and 0 <= finetune["best_acc"] <= 100
    assert json.loads((runs / "partseg-tiny" / "results.json").read_text())["history"]
    for name, ckpt in (("finetune-cls-tiny", "ckpt-best"), ("partseg-tiny", "ckpt-best-on-test"),
                       ("semseg-tiny", "ckpt-best")):
        assert (runs / name / f"eval-{ckpt}.json").is_file(), name

    # The chain again: its first command finds its run and refuses, changing nothing.
    before = snapshot(runs / "pretrain-tiny")
    proc = run(commands[0], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip()
    assert message.startswith("error: runs/pretrain-tiny already holds a run"), message
    assert "--resume" in message and "--out-dir" in message and "--overwrite" in message
    assert len(message.splitlines()) <= 2
    assert snapshot(runs / "pretrain-tiny") == before
