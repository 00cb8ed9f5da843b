"""Shared test fixtures: where the real data slices live and a small pretraining config."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Without a GPU the Triton kernels run under the Triton interpreter. Triton reads this variable
# when it is first imported, so it is set here, before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernels' first-use verdicts (kernels/verify.py) of a test session go to a folder of its
# own, not the user's ~/.cache: every session checks afresh, and leaves nothing behind.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pqae-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
AIRPLANES = SHARED_DATA / "modelnet40_airplanes" / "airplanes_2048.npz"
# Where the Triton kernels really run: a GPU, unless the interpreter was asked for.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEV = torch.device("cuda" if ON_GPU else "cpu")


def torchrun_two(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`args` (a script and its arguments) in two CPU processes of one thread each under
    `torchrun --standalone`, from the repository root; asserts that it exited 0 (showing the
    tails of its output otherwise) and returns the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A user's GPU machine: auto mode takes the Triton path for DEV, an empty verdict cache of
    its own, no verdicts in memory. Yields the cache folder."""
    pytest.importorskip("triton")
    import kernels
    from kernels import verify

    if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PQAE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {"cuda", DEV.type})
    kernels.set_backend("auto")
    verify.reset()
    yield tmp_path / "cache"
    verify.reset()
    kernels.set_backend("auto")


def corrupt_fps(monkeypatch) -> None:
    """Every FPS launch writes wrong output: indices + 1 and centres shifted by 0.25."""
    from kernels import triton_ops as T

    launch = T._launch

    def wrong(kernel, grid, *args, trips=None, **meta):
        launch(kernel, grid, *args, trips=trips, **meta)
        if kernel is T._fps_kernel:
            args[2].add_(1)
            if meta["WRITE_CENTER"]:
                args[3].add_(0.25)

    monkeypatch.setattr(T, "_launch", wrong)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (the real data slices live in ../shared/data)")
    return path


def signal_at(monkeypatch, steps: int, sig: int) -> None:
    """Send this process the real signal `sig` while its `steps`-th training step (counted over
    all runs from now) finishes, as a cluster's preemption would mid-run; once."""
    import signal as _signal  # noqa: F401  (sig is one of its constants)
    from pqae.run import Progress
    tick, calls = Progress.tick, [0]

    def ticking(self):
        tick(self)
        calls[0] += 1
        if calls[0] == steps:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Progress, "tick", ticking)


def preempted_then_resumed(main, config, steps: int, sig: int, monkeypatch, **resume) -> dict:
    """main(config) stopped by `sig` during its `steps`-th step: it exits with status 75 after
    saving out_dir/ckpt-last at that step and writing preempted.json; then main(config with
    --resume) to the end. Returns the resumed run's result."""
    from pqae import checkpoint as ckpt
    from pqae import preempt
    out = Path(config.out_dir)
    signal_at(monkeypatch, steps, sig)
    with pytest.raises(preempt.Preempted) as stopped:
        main(config)
    assert stopped.value.code == preempt.STATUS == 75
    assert f"preempted at step {steps} (" in stopped.value.message, stopped.value.message
    assert "--resume" in stopped.value.message
    assert ckpt.load_meta(ckpt.find_checkpoint(out / "ckpt-last"))["step"] == steps
    import json
    assert json.loads((out / "preempted.json").read_text())["step"] == steps
    assert not (out / "results.json").exists()
    monkeypatch.undo()
    result = main(dataclasses.replace(config, resume=True, **resume))
    assert not (out / "preempted.json").exists()  # the resumed run removed the cue
    return result


def small_pretrain_config(tmp_path: Path, **overrides):
    """A pretraining config small enough for a CPU test: a few seconds per dozen steps."""
    from pretrain import Config
    base = dict(data="procedural", procedural_shapes=64, num_points=256, dim=48, depth=2,
                heads=2, decoder_depth=1, num_group=16, group_size=16, embed_hidden=16,
                batch_size=16, lr=1e-3, epochs=2, warmup_epochs=1, log_every=1, vis_every=0,
                device="cpu", out_dir=str(tmp_path / "run"))
    base.update(overrides)
    return dataclasses.replace(Config(), **base)


class HostToDeviceCopies(TorchDispatchMode):
    """Run a GPU step on the meta device, the CPU's stand-in for a GPU, inside this mode.

    Meta tensors have shapes but no values, so every host sync of a GPU step raises there:
    `.item()`, `.tolist()`, `bool(tensor)`, `nonzero`, boolean masks. Mixing meta and CPU
    tensors raises too, as mixing CUDA and CPU tensors does. The one thing that passes silently
    is a copy of host data to the device (a synchronising cudaMemcpy on a GPU), and this mode
    raises on any op that takes a CPU tensor and returns a meta one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if (any(t.device.type == "cpu" for t in inputs)
                and any(t.device.type == "meta" for t in outputs)):
            raise RuntimeError(f"host-to-device copy in {func}")
        return out


class NoOpOptimizer:
    """Stands in for AdamW where a test runs a training step on the meta device: AdamW's meta
    update is not what a GPU runs (fused AdamW has no meta kernel); tests/test_gpu.py checks
    the real optimizer step on a GPU."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass
