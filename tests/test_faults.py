"""Faults that must not lose, hang or corrupt a run: kills at every point of checkpoint writes
(also twice in a row), corrupt and foreign checkpoints, runs that explode, full disks, frozen
ranks, and converters given values that do not survive their storage dtype."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import pretrain
from conftest import ROOT, small_pretrain_config
from pqae import checkpoint as ckpt
from pqae.errors import UserError


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, no cleanup (not an Exception)."""


def model_at(step: int) -> nn.Module:
    """A model whose every weight records the step it was saved at."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(step))
    return m


def save(directory: Path, step: int) -> None:
    opt = torch.optim.AdamW(model_at(step).parameters())
    ckpt.save_checkpoint(directory, model_at(step), {"step": step},
                         {"optimizer": opt.state_dict(), "step": step})


def checked_save(directory: Path, step: int) -> None:
    """save(), then a passing loss check at the next step: the checkpoint is marked checked,
    so the next save keeps it as `.old` (an unchecked one is superseded instead)."""
    save(directory, step)
    ckpt.stop_if_diverged(1.0, step + 1, 0, directory.parent)
    assert ckpt.checked(directory)


def killed_save(monkeypatch, directory: Path, step: int, at: int) -> bool:
    """save() killed at its `at`-th file-system operation (a rename, a removal, a file write);
    True if the kill happened (False: the save finished before reaching it)."""
    count = itertools.count(1)
    originals = {"replace": os.replace, "rmtree": shutil.rmtree, "torch_save": torch.save,
                 "write_text": Path.write_text}

    def hook(name):
        def wrapped(*args, **kwargs):
            if next(count) == at:
                raise Killed(name)
            return originals[name](*args, **kwargs)
        return wrapped

    with monkeypatch.context() as m:
        m.setattr(os, "replace", hook("replace"))
        m.setattr(shutil, "rmtree", hook("rmtree"))
        m.setattr(torch, "save", hook("torch_save"))
        m.setattr(Path, "write_text", hook("write_text"))
        try:
            save(directory, step)
        except Killed:
            return True
    return False


def newest(directory: Path) -> int:
    found = ckpt.find_checkpoint(directory)
    assert found is not None, sorted(p.name for p in directory.parent.iterdir())
    weights = ckpt.load_weights(found)
    step = ckpt.load_meta(found)["step"]
    assert all(torch.equal(v, torch.full_like(v, float(step))) for v in weights.values())
    assert ckpt.load_resume(found)["step"] == step  # and its resume state is whole
    return step


def test_kills_at_every_point_of_two_writes_in_a_row_lose_nothing(monkeypatch, tmp_path):
    """Checkpoint 1 is in place. Writing 2 is killed at its a-th operation, then writing 3 at its
    b-th, for every (a, b): afterwards the newest complete checkpoint is always found, with its
    weights and resume state, and its step is the newest that was completed."""
    cases = 0
    for a in itertools.count(1):
        run = tmp_path / f"a{a}"
        checked_save(run / "ckpt-last", 1)
        if not killed_save(monkeypatch, run / "ckpt-last", 2, a):
            break
        after_first = newest(run / "ckpt-last")
        assert after_first in (1, 2)
        for b in itertools.count(1):
            again = tmp_path / f"a{a}b{b}"
            shutil.copytree(run, again)
            done = not killed_save(monkeypatch, again / "ckpt-last", 3, b)
            step = newest(again / "ckpt-last")
            assert step >= after_first and (step == 3 if done else step in (after_first, 3))
            cases += 1
            if done:  # the write went through: a clean directory again
                names = sorted(p.name for p in again.iterdir())
                assert names in (["ckpt-last"], ["ckpt-last", "ckpt-last.old"]), names
                break
    assert cases > 30


def test_the_reported_double_kill_case(tmp_path):
    """A kill between the two renames of a swap, then a second one after the next write's
    removal of `.old`: only a complete `.tmp-*` remains, and it is found."""
    checked_save(tmp_path / "ckpt-last", 1)
    save(tmp_path / "ckpt-last", 2)  # ckpt-last (2), ckpt-last.old (1, checked)
    (tmp_path / "ckpt-last").rename(tmp_path / "ckpt-last.tmp-7-0")
    shutil.rmtree(tmp_path / "ckpt-last.old")
    assert newest(tmp_path / "ckpt-last") == 2


def test_a_corrupt_checkpoint_is_skipped_for_its_intact_predecessor(tmp_path, capsys):
    checked_save(tmp_path / "ckpt-last", 1)
    save(tmp_path / "ckpt-last", 2)
    weights = tmp_path / "ckpt-last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    skipped: list[str] = []
    assert ckpt.find_checkpoint(tmp_path / "ckpt-last", skipped) == tmp_path / "ckpt-last.old"
    assert "model.safetensors has" in skipped[0]
    with pytest.raises(UserError, match=r"model\.safetensors cannot be read: truncated"):
        ckpt.load_weights(weights)


def test_a_foreign_or_corrupt_resume_state_is_refused_before_any_step(tmp_path):
    run = tmp_path / "run"
    pretrain.main(small_pretrain_config(tmp_path, max_steps=2))
    # resume.pt of a run with another width, beside weights that fit: refused, no crash.
    other = small_pretrain_config(tmp_path / "o", max_steps=2, dim=36)
    pretrain.main(other)
    shutil.copy(tmp_path / "o" / "run" / "ckpt-last" / "resume.pt", run / "ckpt-last" / "resume.pt")
    meta = ckpt.load_meta(run / "ckpt-last")
    meta["files"]["resume.pt"] = (run / "ckpt-last" / "resume.pt").stat().st_size
    (run / "ckpt-last" / "meta.json").write_text(__import__("json").dumps(meta))
    cfg = small_pretrain_config(tmp_path, resume=True, max_steps=4)
    with pytest.raises(UserError, match=r"resume\.pt: its optimizer state does not fit this model"):
        pretrain.main(cfg)
    # A truncated resume.pt (its recorded size no longer matches): no complete checkpoint.
    state = run / "ckpt-last" / "resume.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match=r"no complete checkpoint .*resume\.pt has 100 bytes"):
        pretrain.main(cfg)


def test_weights_that_are_not_finite_float32_are_refused(tmp_path):
    ckpt.save_weights(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(UserError, match=r"nan\.safetensors: non-finite weights .* w"):
        ckpt.load_weights(tmp_path / "nan.safetensors")
    ckpt.save_weights(tmp_path / "half.safetensors", {"w": torch.ones(2, dtype=torch.float16)})
    with pytest.raises(UserError, match=r"must be float32; found w \(torch\.float16\)"):
        ckpt.load_weights(tmp_path / "half.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"junk\.safetensors cannot be read"):
        ckpt.load_weights(tmp_path / "junk.safetensors")


def test_a_full_disk_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "ckpt-last", 1)

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*ckpt-last.*No space left"):
        save(tmp_path / "ckpt-last", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-last"]  # no partial .tmp left
    assert newest(tmp_path / "ckpt-last") == 1


def test_a_run_that_explodes_without_nan_stops_and_keeps_the_confirmed_checkpoint(tmp_path):
    # Epochs 0-1 warm up at ~1e-6; epoch 2 at an absurd lr. Saved every step; checked every 4.
    cfg = small_pretrain_config(tmp_path, lr=1e30, warmup_epochs=2, epochs=3, log_every=4,
                                save_every=1)
    with pytest.raises(FloatingPointError, match=r"last good checkpoint is .*ckpt-last, saved "
                                                 r"at step 7 and checked by the loss at step 8"):
        pretrain.main(cfg)
    last = tmp_path / "run" / "ckpt-last"
    step = ckpt.load_meta(last)["step"]
    assert step == 7 and ckpt.checked(last)  # confirmed by the passing check at step 8
    assert ckpt.load_meta(last.with_name("ckpt-last.diverged"))["step"] > 8
    weights = ckpt.load_weights(last)
    assert max(v.abs().max().item() for v in weights.values()) < 100  # not exploded
    # Resuming from it starts from sane weights: its first logged loss is finite and small.
    resumed = pretrain.main(small_pretrain_config(tmp_path, resume=True, max_steps=step + 1,
                                                  log_every=1, lr=1e-3, allow_config_change=True))
    assert 0 < resumed["history"][-1]["loss"] < 1
    # A loss above --max-loss stops a run that never goes NaN.
    with pytest.raises(FloatingPointError, match="above --max-loss 1e-06"):
        pretrain.main(small_pretrain_config(tmp_path / "m", max_loss=1e-6))


def test_a_run_diverging_before_its_first_check_names_no_checkpoint_good(tmp_path):
    """lr 1e6 from step 1, saved every step, checked every 4: the checkpoints of steps 1-3
    were never loss-checked (once, the one of step 1 was named "the last good checkpoint" with
    weights near 1e6). Now none is called good; the unchecked one is set aside."""
    cfg = small_pretrain_config(tmp_path, lr=1e6, warmup_epochs=0, log_every=4, save_every=1)
    with pytest.raises(FloatingPointError, match=r"No checkpoint of this run has had its loss "
                                                 r"checked yet.*start the run again"):
        pretrain.main(cfg)
    run = tmp_path / "run"
    assert ckpt.find_checkpoint(run / "ckpt-last") is None
    assert not ckpt.checked(run / "ckpt-last.diverged")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pretrain.main(small_pretrain_config(tmp_path, resume=True))


# --------------------------------------------------------------------------------------------
# Converters: values checked in the dtype they are stored in; nothing written on bad input


def test_s3dis_converter_refuses_values_beyond_float32(tmp_path):
    from data_prep import s3dis as prep
    ann = tmp_path / "raw" / "Area_1" / "office_1" / "Annotations"
    ann.mkdir(parents=True)
    lines = [f"{i * 0.01:.3f} 0.5 0.5 10 20 30" for i in range(50)] + ["1e300 0.5 0.5 10 20 30"]
    (ann / "chair_1.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "s3dis.h5"
    with pytest.raises(prep.ConversionError, match="office_1: values beyond float32"):
        prep.main(prep.Config(root=tmp_path / "raw", out=out, areas=(1,), workers=1,
                              check_counts=False))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_shapenetpart_reader_refuses_values_beyond_float32(tmp_path):
    from data_prep import shapenetpart as prep
    f = tmp_path / "shape.txt"
    f.write_text("0.1 0.2 0.3 0 0 1 0\n0.1 1e300 0.3 0 0 1 1\n")
    xyz, labels, problem = prep.read_shape(f, 0)
    assert xyz is None and "line 2: NaN, inf or beyond float32" in problem


def test_modelnet_dat_refuses_values_beyond_float32_and_reads_protocol_2(tmp_path):
    import pickle
    from data_prep.common import ConversionError, read_numpy_pickle
    arrays = [np.zeros((4, 6), np.float32), np.array([1e300, 0.0])]
    (tmp_path / "p2.pkl").write_bytes(pickle.dumps(arrays, protocol=2))
    back = read_numpy_pickle(tmp_path / "p2.pkl", "a test pickle")  # _codecs.encode, latin-1
    assert np.array_equal(back[0], arrays[0]) and back[1][0] == 1e300
    evil = pickle.dumps(arrays, protocol=2).replace(b"latin1", b"utf_16")  # another codec
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(ConversionError, match="only latin-1 text"):
        read_numpy_pickle(tmp_path / "evil.pkl", "a test pickle")
    # A .dat cache whose float64 cloud holds 1e300: finite as read, inf as stored: refused.
    from data_prep import modelnet40
    from test_cls_data import make_dat_root
    clouds = {s: [np.zeros((8192, 6)) + 0.1 for _ in range(2)] for s in ("train", "test")}
    clouds["train"][1][5, 1] = 1e300
    labels = {s: [np.array([0], np.int32), np.array([1], np.int32)] for s in ("train", "test")}
    root = make_dat_root(tmp_path, clouds, labels)
    with pytest.raises(ConversionError, match="bad clouds"):
        modelnet40.main(modelnet40.Config(root=root, out=tmp_path / "o.h5", source="dat",
                                          check_counts=False))
    assert not (tmp_path / "o.h5").exists()


def test_fewshot_convert_writes_nothing_unless_every_episode_passes(tmp_path):
    import pickle
    from data_prep import modelnet_fewshot as mf
    from test_fewshot import release_episode
    for fold in (0, 1, 2):
        src = tmp_path / "release" / "2way_3shot" / f"{fold}.pkl"
        src.parent.mkdir(parents=True, exist_ok=True)
        ep = release_episode(seed=fold)
        if fold == 2:
            ep["test"][0] = (ep["test"][0][0], 0, np.array([31], np.int32))  # bad mapping
        src.write_bytes(pickle.dumps(ep, protocol=2))  # the released files' protocol
    with pytest.raises(ValueError, match="one-to-one"):
        mf.convert(tmp_path / "release", tmp_path / "out", ways=(2,), shots=(3,), folds=(0, 1, 2),
                   test_per_class=2)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # episodes 0, 1 neither
    written = mf.convert(tmp_path / "release", tmp_path / "out", ways=(2,), shots=(3,),
                         folds=(0, 1), test_per_class=2)
    assert [p.name for p in written] == ["0.h5", "1.h5"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["2way_3shot"]


# --------------------------------------------------------------------------------------------
# Errors that name the file and the cause


def test_labels_beyond_num_classes_are_refused_at_load_time(tmp_path):
    import finetune_cls
    from pqae import data as pdata
    import h5py
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f.create_dataset(f"{split}/points", data=np.random.default_rng(0).standard_normal(
                (4, pdata.SCANOBJECTNN_POINTS, 3)).astype(np.float32))
            f.create_dataset(f"{split}/labels", data=np.array([0, 3, 12, 1], np.int64))
    cfg = finetune_cls.Config(data="scanobjectnn", data_path=str(path), num_classes=10,
                              device="cpu", out_dir=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"scan\.h5: 'test' labels span 0\.\.12, beyond "
                                        r"--num-classes 10; give --num-classes 13"):
        finetune_cls.main(cfg)


def _shapenet55(path: Path, shapes: int = 2) -> Path:
    import h5py
    from pqae import data as pdata
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f.create_dataset(f"{split}/points", data=np.random.default_rng(0).standard_normal(
                (shapes, pdata.SHAPENET55_POINTS, 3)).astype(np.float32))
    return path


def test_unreadable_data_files_are_one_line_naming_the_file(tmp_path):
    """A truncated or garbage HDF5 file, a truncated .npz and an .npz holding an object array:
    each is a BadInput naming the file, the layout expected and the cause (was: a 21-29 line
    traceback from h5py or numpy whose last line named no file). Through the command line:
    one `error:` line, exit 2, no traceback, nothing written."""
    from pqae import data as pdata
    from pqae.errors import BadInput
    whole = _shapenet55(tmp_path / "whole.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 100)
    for name in ("cut.h5", "junk.h5"):
        with pytest.raises(BadInput, match=rf"{name} cannot be read as an HDF5 file with groups "
                                           rf"'train' and 'test'.*: (OSError|ValueError|KeyError)"):
            pdata.load_shapenet55(tmp_path / name)
    points = np.zeros((3, pdata.AIRPLANES_POINTS, 3), np.float32)
    np.savez(tmp_path / "whole.npz", points=points, is_test=np.zeros(3, bool))
    raw = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(tmp_path / "objects.npz", points=np.array([points[0], None], dtype=object),
             is_test=np.zeros(2, bool))
    for name, cause in (("cut.npz", "BadZipFile|EOFError|ValueError"),
                        ("objects.npz", "ValueError: Object arrays")):
        with pytest.raises(BadInput, match=rf"{name} cannot be read as an \.npz with keys "
                                           rf"'points'.*: ({cause})"):
            pdata.load_airplanes(tmp_path / name)
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--data", "shapenet55",
                           "--data-path", str(tmp_path / "cut.h5"), "--device", "cpu",
                           "--out-dir", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {tmp_path / 'cut.h5'} cannot be read as an HDF5 file")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # the run's directory went with its lock


def test_clouds_that_cannot_be_normalised_are_refused_with_their_indices(tmp_path):
    """A cloud x1e30, one with a point at 1e25, and an all-zero one trained silently once (the
    normalisation made them all zeros). Now the loader refuses them, naming each kind and the
    indices within the group the user knows ('train', not test+train)."""
    import h5py
    from pqae import data as pdata
    from pqae.errors import BadInput
    rng = np.random.default_rng(0)
    clouds = rng.standard_normal((5, pdata.SHAPENET55_POINTS, 3)).astype(np.float32)
    clouds[1] *= 1e30
    clouds[2, 7] = 1e25
    clouds[4] = 0.0
    with h5py.File(tmp_path / "s55.h5", "w") as f:
        f["test/points"] = clouds[:1]  # one good test cloud, read first by split "all"
        f["train/points"] = clouds
    expected = (r"s55\.h5 'train/points': cloud\(s\) that cannot be normalised: coordinates "
                r"beyond \+-1e\+09 in sample\(s\) 1, 2; zero extent \(every point the same\) "
                r"in sample\(s\) 4$")
    for split in ("all", "train"):
        with pytest.raises(BadInput, match=expected):
            pdata.load_shapenet55(tmp_path / "s55.h5", split)
    assert pdata.load_shapenet55(tmp_path / "s55.h5", "test").shape[0] == 1
    clouds[3, 0, 0] = np.nan
    with h5py.File(tmp_path / "cls.h5", "w") as f:
        for split in ("train", "test"):
            f[f"{split}/points"] = clouds[:, : pdata.MODELNET40_POINTS]
            f[f"{split}/labels"] = np.zeros(5, np.int64)
    with pytest.raises(BadInput, match=r"cls\.h5 'test/points': .*: NaN or inf values in "
                                       r"sample\(s\) 3; coordinates beyond .* 1, 2; zero extent"):
        pdata.load_modelnet40(tmp_path / "cls.h5", "test")


def test_degenerate_part_shapes_and_rooms_are_refused_with_their_names(tmp_path):
    """Part segmentation: a shape whose points are all equal, one with a point at 1e25; the
    shape is named with its index in the split. Semantic segmentation: the same per room."""
    import h5py
    from pqae import s3dis
    from pqae import shapenetpart as sp
    from pqae.errors import BadInput
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((12, 3)).astype(np.float32)
    pts[4:8] = 0.5  # shape 1: four equal points
    with h5py.File(tmp_path / "parts.h5", "w") as f:
        g = f.create_group("test")
        g["points"] = pts
        g["labels"] = np.array([47, 48, 49, 47] * 3, np.int64)
        g["offsets"] = np.array([0, 4, 8, 12], np.int64)
        g["category"] = np.array([15, 15, 15], np.int64)
        g["names"] = [b"table-a", b"table-b", b"table-c"]
    with pytest.raises(BadInput, match=r"parts\.h5: 'test' shape\(s\) that cannot be "
                                       r"normalised: zero extent .* in table-b \(index 1\)$"):
        sp.load_split(tmp_path / "parts.h5", "test")
    room = np.concatenate([rng.uniform(0, 3, (50, 3)), np.zeros((50, 3)),
                           np.zeros((50, 1))], 1).astype(np.float32)
    far = room.copy()
    far[7, 0] = 1e25
    flat = room.copy()
    flat[:, :3] = 1.0
    for bad, what in ((far, r"coordinates beyond \+-1e\+09"), (flat, "zero extent")):
        with pytest.raises(BadInput, match=rf"room Area_2_office_9 has {what}"):
            s3dis.make_rooms({"Area_1_office_1": room, "Area_2_office_9": bad}, "rooms.h5")


def test_a_negative_part_label_is_refused_at_load(tmp_path):
    """Part label -1 once passed the check (it indexed part 49 of the table) and crashed at
    step 1 with an IndexError, after config.json and tb/ were written."""
    import h5py
    from pqae import shapenetpart as sp
    from pqae.errors import BadInput
    with h5py.File(tmp_path / "parts.h5", "w") as f:
        g = f.create_group("test")
        g["points"] = np.full((6, 3), 0.1, np.float32)
        # a table (category 15, parts 47..49): -1 read as part 49 passed as one of its own
        g["labels"] = np.array([47, 48, -1, 49, 47, 48], np.int64)
        g["offsets"] = np.array([0, 6], np.int64)
        g["category"] = np.array([15], np.int64)
        g["names"] = [b"table-1"]
    with pytest.raises(BadInput, match=r"parts\.h5: shape table-1 \(Table\) has part labels "
                                       r"outside its parts 47\.\.49"):
        sp.load_split(tmp_path / "parts.h5", "test")


def test_reference_converter_names_the_file_and_what_it_is(tmp_path):
    from pqae.formats import read_reference
    ckpt.save_weights(tmp_path / "ours.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(UserError, match=r"ours\.safetensors is a safetensors file, not a reference"):
        read_reference(tmp_path / "ours.safetensors")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(UserError, match=r"cut\.pth is not a readable reference checkpoint"):
        read_reference(tmp_path / "cut.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"base_model": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"evil\.pth is not a readable reference checkpoint"):
        read_reference(tmp_path / "evil.pth")


# --------------------------------------------------------------------------------------------
# A frozen peer under torchrun


def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    script = tmp_path / "frozen.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import pretrain\n"
        "from pathlib import Path\n"
        "from conftest import small_pretrain_config\n"
        "from pqae import cli\n"
        "real = pretrain.make_train_step\n"
        "def make(*a, **k):\n"
        "    step_fn = real(*a, **k)\n"
        "    def step(i, perm, return_outputs=False):\n"
        "        if i == 3 and os.environ['RANK'] == '1':\n"
        "            os.kill(os.getpid(), signal.SIGSTOP)  # SIGSTOP: frozen, not dead\n"
        "        return step_fn(i, perm, return_outputs)\n"
        "    return step\n"
        "pretrain.make_train_step = make\n"
        f"cfg = small_pretrain_config(Path({str(tmp_path)!r}), collective_timeout=4.0)\n"
        "sys.argv = sys.argv[:1]\n"
        "cli.run(lambda _: pretrain.main(cfg), pretrain.Config, pretrain.PRESETS)\n")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert ("error: rank 0: a collective waited 4 s (--collective-timeout) for the other "
            "processes; rank(s) [1] did not answer") in proc.stderr, proc.stderr[-3000:]
    assert took < 60, took  # torch's default would have waited 30 minutes


def test_s3dis_converter_checks_the_reference_room_counts(tmp_path):
    from data_prep import s3dis as prep
    (tmp_path / "raw" / "Area_1" / "office_1" / "Annotations").mkdir(parents=True)
    with pytest.raises(prep.ConversionError, match=r"Area_1: 1 \(the reference's list: 44\).*"
                                                   r"--no-check-counts"):
        prep.main(prep.Config(root=tmp_path / "raw", out=tmp_path / "s.h5", areas=(1,), workers=1))
    assert not (tmp_path / "s.h5").exists()
