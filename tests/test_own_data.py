"""The README's path for a user's own folders of point clouds, run as written: a folder to
shards, pretraining on them, a labelled folder to a classification file, a probe of the
pretrained encoder on it, and its features into one file. Each command gets only flags that
shrink it (points, steps)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import h5py
import numpy as np

from conftest import ROOT

SHRINK = {"data_prep.folder": ["--points", "600", "--workers", "1"],
          "pretrain.py": ["--preset", "tiny", "--num-points", "512", "--max-steps", "4",
                          "--batch-size", "16"],
          "pqae.probe": [], "pqae.embed": []}


def readme_block() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- own-data"):]
    block = block[block.index("```bash") + len("```bash"):block.index("```\n\n")]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]


def make_folders(cwd):
    rng = np.random.default_rng(0)
    for i in range(40):  # unlabelled scans, 700 points each, one with a NaN row
        x = rng.standard_normal((700, 3)) * rng.uniform(0.2, 2, 3)
        if i == 7:
            x[3] = np.nan
        (cwd / "my_scans" / f"site{i % 3}").mkdir(parents=True, exist_ok=True)
        np.save(cwd / "my_scans" / f"site{i % 3}" / f"{i}.npy", x)
    for kind in ("ball", "box", "rod"):  # three classes of 10 objects
        (cwd / "my_objects" / kind).mkdir(parents=True)
        for i in range(10):
            x = rng.standard_normal((700, 3))
            x = {"ball": x / np.linalg.norm(x, axis=1, keepdims=True),
                 "box": np.clip(x, -1, 1) * [1, 0.5, 0.5], "rod": x * [2, 0.1, 0.1]}[kind]
            np.savetxt(cwd / "my_objects" / kind / f"{i}.xyz", x)


def test_the_readme_own_data_path_runs_as_written(tmp_path):
    make_folders(tmp_path)
    commands = readme_block()
    assert len(commands) == 5
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in commands:
        assert argv[0] == "python"
        name = argv[2] if argv[1] == "-m" else argv[1]
        cmd = [sys.executable, *argv[1:], *SHRINK[name]]
        if name.endswith(".py"):
            cmd[1] = str(ROOT / name)
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, (argv, p.stdout[-2000:], p.stderr[-2000:])
    shards = sorted((tmp_path / "data" / "my_scans").glob("shard-*.h5"))
    assert len(shards) == 1 and (tmp_path / "data" / "my_scans" / "manifest.json").is_file()
    with h5py.File(shards[0]) as f:
        assert f["train/points"].shape == (40, 600, 3) and f.attrs["checked_finite"]
    assert (tmp_path / "runs" / "my-pretrain" / "ckpt-final" / "model.safetensors").is_file()
    probe = next((tmp_path / "runs" / "my-pretrain").glob("probe-ckpt-final-*.json"))
    assert "linear" in probe.read_text()
    with h5py.File(tmp_path / "runs" / "my-features.h5") as f:
        assert f["features"].shape[0] == 30 and len(set(f["labels"][()])) == 3
