"""What a shared cluster does to a run, done for real to the command-line scripts: a polite
end (SIGTERM to torchrun's agent, Ctrl-C), a second run in the same directory, an unwritable
directory, a full disk. Each ends with one clean line and loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pqae import checkpoint as ckpt

# 64 shapes / 16 = 4 steps per epoch, 4 loop epochs: 16 steps of ~0.1 s on one CPU core
ARGS = ["--preset", "tiny", "--procedural-shapes", "64", "--num-points", "256", "--num-group",
        "16", "--group-size", "16", "--batch-size", "16", "--epochs", "3", "--log-every", "1",
        "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def pretrain(out: Path, *extra: str, launcher=(sys.executable,), **kw) -> subprocess.Popen:
    return subprocess.Popen([*launcher, str(ROOT / "pretrain.py"), *ARGS, "--out-dir", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=ROOT, **kw)


def signal_at_line(proc: subprocess.Popen, pattern: str, sig: int) -> str:
    """Read the process's output until a line matches `pattern`, send it `sig`, and return all
    its output once it ended."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return "".join(seen) + rest


def finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def same_weights(a: Path, b: Path) -> None:
    wa, wb = ckpt.load_weights(a), ckpt.load_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigterm_to_torchrun_saves_and_the_resumed_run_is_the_uninterrupted_one(tmp_path):
    """SLURM or Kubernetes ends a 2-process torchrun job: SIGTERM to the agent, which
    forwards it to its workers. They agree on a step, rank 0 saves it, they exit 75 after one
    line; `--resume` under torchrun ends with the uninterrupted run's weights bit for bit."""
    full = finished(pretrain(tmp_path / "a", launcher=TORCHRUN))
    proc = pretrain(tmp_path / "b", launcher=TORCHRUN)
    out = signal_at_line(proc, r"step 3/16 ", signal.SIGTERM)
    assert proc.returncode != 0  # the agent's own status (it reports the signal it got)
    mark = json.loads((tmp_path / "b" / "preempted.json").read_text())
    step = mark["step"]
    assert 3 <= step < 16, out[-3000:]
    assert out.count(f"preempted at step {step} (SIGTERM)") == 1, out[-3000:]  # rank 0 alone
    assert "--resume" in mark["resume"] and mark["resume"].startswith("torchrun --nproc_per_node=2")
    assert ckpt.load_meta(ckpt.find_checkpoint(tmp_path / "b" / "ckpt-last"))["step"] == step
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = finished(pretrain(tmp_path / "b", "--resume", launcher=TORCHRUN))
    assert f"resumed from {tmp_path / 'b' / 'ckpt-last'} at step {step}" in resumed
    assert not (tmp_path / "b" / "preempted.json").exists()
    same_weights(tmp_path / "a" / "ckpt-final", tmp_path / "b" / "ckpt-final")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["history"] == b["history"] and "world 2" in full


def test_ctrl_c_saves_with_one_line_and_no_traceback(tmp_path):
    """SIGINT (Ctrl-C) to a single-process run: one line naming the step and the resume
    command, exit status 75, no KeyboardInterrupt traceback, ckpt-last at that step."""
    out = signal_at_line(pretrain(tmp_path / "run"), r"step 2/16 ", signal.SIGINT)
    mark = json.loads((tmp_path / "run" / "preempted.json").read_text())
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert re.search(rf"preempted at step {mark['step']} \(SIGINT\): .*ckpt-last saved; resume "
                     rf"with: python .*pretrain.py .*--out-dir {tmp_path / 'run'} --resume", out)
    assert ckpt.load_meta(ckpt.find_checkpoint(tmp_path / "run" / "ckpt-last"))["step"] == mark["step"]


def test_a_second_signal_during_the_save_changes_nothing(tmp_path, monkeypatch):
    """SIGTERM, then SIGTERM again while ckpt-last is being written: the second is noted, the
    checkpoint is whole and the run stops as after one."""
    import pretrain as script
    from conftest import signal_at, small_pretrain_config
    from pqae import preempt

    write = ckpt.save_weights

    def interrupted_write(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # the second, in the middle of the save
        return write(*a, **kw)

    signal_at(monkeypatch, 2, signal.SIGTERM)
    monkeypatch.setattr(ckpt, "save_weights", interrupted_write)
    with pytest.raises(preempt.Preempted):
        script.main(small_pretrain_config(tmp_path))
    last = tmp_path / "run" / "ckpt-last"
    assert ckpt.checkpoint_problem(last) is None and ckpt.load_meta(last)["step"] == 2
    assert not list(last.parent.glob("ckpt-last.tmp-*"))


@contextlib.contextmanager
def holder(out: Path):
    """Another process holding out's lock, as a run in it would."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from pqae import lock; "
                             "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                             str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_one_run_per_directory_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    with holder(out) as other:
        t0 = time.monotonic()
        proc = pretrain(out)
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
        assert f"error: {out} is in use by another run (pid {other.pid} on " in text
        assert not (out / "config.json").exists() and not (out / "tb").exists()
        assert time.monotonic() - t0 < 60  # at once: before the data and the model
    # the holder died without a word (SIGKILL): its lock went with it
    proc = pretrain(out, "--max-steps", "2")
    text = finished(proc)
    assert f"note: took over the lock of {out} from a run that is gone (pid {other.pid}" in text
    assert (out / ".lock").read_text() == ""  # released: no holder recorded
    text = finished(pretrain(out, "--resume", "--max-steps", "3"))
    assert "took over" not in text  # a run that ended is no holder


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = pretrain(blocker / "run")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert f"error: cannot write to --out-dir {blocker / 'run'}" in text
    assert "data procedural" not in text  # refused before the data were made


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path):
    """--out-dir on a read-only mount (a tmpfs mounted ro, where this machine lets us): one
    line, exit 2, before the data are made (root ignores permission bits, not a ro mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = pretrain(mnt / "run")
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
        assert re.search(rf"error: cannot write to --out-dir {mnt / 'run'}: Read-only file "
                         rf"system", text), text[-2000:]
        assert "data procedural" not in text
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_during_the_weights_keeps_the_previous_checkpoint(tmp_path):
    """The safetensors write itself fails (a file-size limit below the weights' size): one
    line naming the checkpoint and the cause, exit 2, nothing partial left, the previous
    checkpoint intact."""
    out = tmp_path / "run"
    finished(pretrain(out, "--max-steps", "4"))
    weights = (out / "ckpt-last" / "model.safetensors").stat().st_size
    proc = pretrain(out, "--resume", "--save-every", "1",
                    preexec_fn=_limit_file_size(weights // 2))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert re.search(rf"error: could not write checkpoint {out / 'ckpt-last'} \(.*model\."
                     rf"safetensors.*\); its temporary files were removed and the previous "
                     rf"checkpoint {out / 'ckpt-last'} is intact", text), text[-2000:]
    assert not list(out.glob("ckpt-last.tmp-*"))
    assert ckpt.load_meta(out / "ckpt-last")["step"] == 4


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_full_disk_during_the_resume_file_keeps_the_previous_checkpoint(tmp_path, how):
    """The write of resume.pt (torch.save) fails for want of space: a really full file system
    (a small tmpfs, where this machine lets us mount one), or a file-size limit (EFBIG) where
    it does not. One line naming the checkpoint and the cause, exit 2, the temporary files
    removed, the previous checkpoint intact and resumable."""
    out = tmp_path / "disk" / "run"
    if how == "tmpfs" and not _mount_tmpfs(out.parent, "64m"):
        pytest.skip("cannot mount a tmpfs here (the rlimit case runs instead)")
    try:
        finished(pretrain(out, "--max-steps", "4"))  # ckpt-last at step 4 (end of epoch 0)
        weights = (out / "ckpt-last" / "model.safetensors").stat().st_size
        resume = (out / "ckpt-last" / "resume.pt").stat().st_size
        assert resume > 1.5 * weights  # room for the weights, not for the optimizer state
        if how == "tmpfs":
            used = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            size = (used + weights + resume // 2) // 4096 * 4096
            assert subprocess.run(["mount", "-o", f"remount,size={size}", str(out.parent)]
                                  ).returncode == 0
            extra = {}
        else:
            extra = {"preexec_fn": _limit_file_size(weights + resume // 2)}
        proc = pretrain(out, "--resume", "--save-every", "1", **extra)
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
        cause = r"[0-9.]+ MiB free on its file system"
        assert re.search(rf"error: could not write checkpoint {out / 'ckpt-last'} \(.*{cause}.*\); "
                         rf"its temporary files were removed and the previous checkpoint "
                         rf"{out / 'ckpt-last'} is intact", text), text[-2000:]
        assert not list(out.glob("ckpt-last.tmp-*"))
        assert ckpt.checkpoint_problem(out / "ckpt-last") is None
        assert ckpt.load_meta(out / "ckpt-last")["step"] == 4
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(out.parent)], capture_output=True)
