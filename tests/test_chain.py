"""The README's path from pretraining to every downstream task, through the real entry points.

The commands are read from the README's chain block and run in order, in a fresh directory,
as a new user would run them: no architecture flag anywhere, each downstream task given the
pretraining checkpoint, then the saved models evaluated from their checkpoints alone. Each
command gets a few extra flags that only shrink the run (steps, epochs, data sizes), so that
CI stays fast; the README's own timings are for the commands as written.

Every number the chain writes (losses of every logged step, accuracies, IoUs, per epoch and
final, in every results.json and eval-*.json) is compared with `golden_chain.json`: bit for
bit on the torch build and CPU kind that recorded it, the first logged loss to 1e-3 elsewhere.
A change that is meant to change the numbers records them again, and says why in its commit:

    python tests/test_chain.py --record
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT

GOLDEN = Path(__file__).with_name("golden_chain.json")

# Flags that make each command small; none of them names the architecture.
SHRINK = {
    "pretrain.py": ["--procedural-shapes", "64", "--procedural-points", "512", "--max-steps", "4"],
    "finetune_cls.py": ["--epochs", "1", "--procedural-train", "32", "--procedural-test", "16",
                        "--votes", "1"],
    "fewshot.py": ["--folds", "0", "--finetune.epochs", "1"],
    "partseg.py": ["--epochs", "1", "--procedural-shapes", "16"],
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


def numbers(obj, path: str = ""):
    """(path, value) of every number in a results JSON, the config aside."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key != "config":
                yield from numbers(value, f"{path}/{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def chain_numbers(runs: Path) -> dict[str, dict[str, float]]:
    """The numbers of every results.json and eval-*.json under `runs`, by file."""
    return {str(f.relative_to(runs)): dict(numbers(json.loads(f.read_text())))
            for f in sorted(runs.rglob("*.json")) if f.name.startswith(("results", "eval-"))}


def environment() -> dict[str, str]:
    """What decides the last bits of a CPU run: the torch build and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cuda": torch.cuda.is_available()}


def same(a: float, b: float) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or nan


def check_golden(runs: Path) -> None:
    golden, got = json.loads(GOLDEN.read_text()), chain_numbers(runs)
    assert {f: sorted(v) for f, v in got.items()} == \
        {f: sorted(v) for f, v in golden["numbers"].items()}, "the chain wrote other numbers"
    if golden["environment"] == environment():
        differ = [(f, k, golden["numbers"][f][k], v) for f, values in got.items()
                  for k, v in values.items() if not same(v, golden["numbers"][f][k])]
        assert not differ, f"{len(differ)} numbers differ from {GOLDEN.name}: {differ[:5]}"
    else:  # another build or CPU: only the first logged loss is comparable
        first = "pretrain-tiny/results.json", "/history[0]/loss"
        assert got[first[0]][first[1]] == pytest.approx(golden["numbers"][first[0]][first[1]],
                                                       rel=1e-3)


def run_chain(directory: Path) -> list[list[str]]:
    """Every command of the README's chain, shrunk, in `directory`; each must succeed and end
    by saying what it made."""
    commands = readme_chain()
    for argv in commands:
        proc = run(argv, directory)
        assert proc.returncode == 0, (argv, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        tail = proc.stdout[proc.stdout.rindex("done | "):]
        assert "results" in tail, tail
    return commands


def test_readme_chain_runs_as_written(tmp_path):
    commands = readme_chain()
    scripts = [c[1] for c in commands]
    assert scripts[:5] == ["pretrain.py", "finetune_cls.py", "fewshot.py", "partseg.py",
                           "semseg.py"], scripts
    assert any("--eval-ckpt" in c for c in commands)
    architecture = {"--dim", "--depth", "--heads", "--embed-hidden"}
    assert not any(architecture & set(argv) for argv in commands)
    run_chain(tmp_path)
    runs = tmp_path / "runs"
    check_golden(runs)
    for name in ("pretrain-tiny", "finetune-cls-tiny", "fewshot-tiny", "partseg-tiny", "semseg-tiny"):
        result = json.loads((runs / name / "results.json").read_text())
        assert "config" in result, name
    assert (runs / "pretrain-tiny" / "ckpt-final" / "model.safetensors").is_file()
    finetune = json.loads((runs / "finetune-cls-tiny" / "results.json").read_text())
    assert finetune["config"]["pretrained"] == "runs/pretrain-tiny/ckpt-final"
    assert finetune["best_acc"] is not None and 0 <= finetune["best_acc"] <= 100
    assert json.loads((runs / "partseg-tiny" / "results.json").read_text())["history"]
    for name, ckpt in (("finetune-cls-tiny", "ckpt-best"), ("partseg-tiny", "ckpt-best"),
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


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit(f"usage: python {sys.argv[0]} --record   (writes {GOLDEN})")
    with tempfile.TemporaryDirectory() as tmp:
        run_chain(Path(tmp))
        numbers_ = chain_numbers(Path(tmp) / "runs")
    GOLDEN.write_text(json.dumps({"environment": environment(), "numbers": numbers_}, indent=1)
                      + "\n")
    print(f"wrote {GOLDEN}: {sum(map(len, numbers_.values()))} numbers in {len(numbers_)} files")
