"""fewshot.py and data_prep/modelnet_fewshot.py: episodes, safe pickles, the table, resume."""

from __future__ import annotations

import dataclasses
import json
import pickle
import signal
import statistics
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fewshot
from conftest import signal_at, torchrun_two
from data_prep import modelnet_fewshot as mf
from pqae import checkpoint as ckpt
from pqae import data, preempt


def fake_modelnet(path: Path, train_per_class: int = 3, test_per_class: int = 2) -> Path:
    """A ModelNet40 HDF5 in the data_prep.modelnet40 layout whose shape i has x = i everywhere
    (so an episode's points tell which source shape they came from) and a y ramp."""
    ramp = np.linspace(-1, 1, data.MODELNET40_POINTS, dtype=np.float32)
    with h5py.File(path, "w") as f:
        for split, k in (("train", train_per_class), ("test", test_per_class)):
            labels = np.tile(np.arange(40), k).astype(np.int64)  # interleaved classes
            points = np.zeros((len(labels), data.MODELNET40_POINTS, 3), np.float32)
            points[:, :, 0] = np.arange(len(labels))[:, None]
            points[:, :, 1] = ramp
            f.create_dataset(f"{split}/points", data=points)
            f.create_dataset(f"{split}/labels", data=labels)
    return path


# --------------------------------------------------------------------------------------------
# Episode generation


@pytest.mark.parametrize("way,shot", [(5, 10), (10, 20)])
def test_draw_episode_counts_and_determinism(way, shot):
    train = np.repeat(np.arange(40), 30)
    test = np.repeat(np.arange(40), 25)
    a = mf.draw_episode(train, test, way, shot, fold=3, seed=0)
    b = mf.draw_episode(train, test, way, shot, fold=3, seed=0)
    for split, labels, k in (("train", train, shot), ("test", test, mf.TEST_PER_CLASS)):
        idx, ep = a[split]
        assert np.array_equal(idx, b[split][0]) and np.array_equal(ep, b[split][1])
        assert len(idx) == way * k and len(set(idx.tolist())) == len(idx)  # no shape twice
        assert np.bincount(ep, minlength=way).tolist() == [k] * way  # labels 0..way-1, k each
        # Each episode label is one ModelNet class, and `way` distinct classes are used.
        pairs = {(int(e), int(labels[i])) for e, i in zip(ep, idx)}
        assert len(pairs) == way and len({c for _, c in pairs}) == way
        assert not np.array_equal(ep, np.sort(ep))  # the list is shuffled
    # Both splits use the same classes in the same episode-label order.
    assert episode_classes(a["train"], train) == episode_classes(a["test"], test)
    # Other folds and seeds give other episodes.
    for fold, seed in ((4, 0), (3, 1)):
        other = mf.draw_episode(train, test, way, shot, fold, seed)
        assert episode_classes(other["train"], train) != episode_classes(a["train"], train)


def episode_classes(draw: tuple[np.ndarray, np.ndarray], labels: np.ndarray) -> list[int]:
    """The ModelNet class of each episode label, in episode-label order."""
    idx, ep = draw
    return [int(labels[idx[ep == e][0]]) for e in range(ep.max() + 1)]


def test_generate_writes_loadable_reproducible_episodes(tmp_path):
    src = fake_modelnet(tmp_path / "modelnet40.h5")
    kw = dict(ways=(5,), shots=(2,), folds=(0, 1), seed=7, test_per_class=2)
    first = mf.generate(src, tmp_path / "a", **kw)
    second = mf.generate(src, tmp_path / "b", **kw)
    assert [p.relative_to(tmp_path / "a") for p in first] == [Path("5way_2shot/0.h5"), Path("5way_2shot/1.h5")]
    with h5py.File(src, "r") as f:
        source_labels = {s: f[f"{s}/labels"][()] for s in ("train", "test")}
    for p, q in zip(first, second):
        with h5py.File(p, "r") as f, h5py.File(q, "r") as g:
            for split, per_class in (("train", 2), ("test", 2)):
                pts, lab, orig = (f[f"{split}/{k}"][()] for k in ("points", "labels", "original_labels"))
                for k in ("points", "labels", "original_labels"):
                    assert np.array_equal(f[f"{split}/{k}"][()], g[f"{split}/{k}"][()])
                assert pts.shape == (5 * per_class, data.MODELNET40_POINTS, 3)
                assert np.bincount(lab).tolist() == [per_class] * 5
                # The points are those of the drawn source shape (x = source index), whose
                # class is the recorded original label.
                src_idx = pts[:, 0, 0].astype(int)
                assert np.array_equal(source_labels[split][src_idx], orig)
            assert f.attrs["way"] == 5 and f.attrs["shot"] == 2
        # The file is what finetune_cls's ModelNet40 loader reads.
        points, labels = data.load_modelnet40(p, "train")
        assert points.shape == (10, data.MODELNET40_POINTS, 3) and labels.max() == 4
    with h5py.File(first[0], "r") as f, h5py.File(first[1], "r") as g:
        assert not np.array_equal(f["train/original_labels"][()], g["train/original_labels"][()])


# --------------------------------------------------------------------------------------------
# Released pickles


def release_episode(way: int = 2, shot: int = 3, test_per_class: int = 2, seed: int = 0) -> dict:
    """An episode dict shaped like the released files: (points (8192, 6), label, original)."""
    rng = np.random.default_rng(seed)
    originals = [7, 31][:way]

    def items(k):
        return [(rng.standard_normal((data.MODELNET40_POINTS, 6)).astype(np.float32), e,
                 np.array([originals[e]], np.int32)) for e in range(way) for _ in range(k)]

    return {"train": items(shot), "test": items(test_per_class)}


def test_released_pickle_is_validated_and_converted(tmp_path):
    ep = release_episode()
    src = tmp_path / "release" / "2way_3shot" / "0.pkl"
    src.parent.mkdir(parents=True)
    src.write_bytes(pickle.dumps(ep, protocol=4))
    [out] = mf.convert(tmp_path / "release", tmp_path / "out", ways=(2,), shots=(3,), folds=(0,),
                       test_per_class=2)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["train/points"][()], np.stack([p[:, :3] for p, _, _ in ep["train"]]))
        assert f["test/labels"][()].tolist() == [0, 0, 1, 1]
        assert f["test/original_labels"][()].tolist() == [7, 7, 31, 31]
    # Wrong shot count, wrong label mapping: refused with the reason.
    with pytest.raises(ValueError, match="expected a list of 2 x 5"):
        mf.read_episode(src, way=2, shot=5, test_per_class=2)
    bad = release_episode()
    bad["test"][0] = (bad["test"][0][0], 0, np.array([31], np.int32))
    src.write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(ValueError, match="one-to-one"):
        mf.read_episode(src, way=2, shot=3, test_per_class=2)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_or_foreign_files_are_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"train": [(np.zeros(3), 0, _Evil(marker))], "test": []},
                                  protocol=4))
    with pytest.raises(ValueError, match="refused to load global builtins.exec"):
        mf.read_pickle(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the unrestricted loader WOULD have run it
    assert marker.exists()
    # Not a protocol 2-5 pickle (an HDF5 file, a protocol-0 pickle): refused before unpickling.
    h5 = fake_modelnet(tmp_path / "x.h5", 1, 1)
    with pytest.raises(ValueError, match="not a pickle of protocol 2-5"):
        mf.read_pickle(h5)
    (tmp_path / "p0.pkl").write_bytes(pickle.dumps([1], protocol=0))
    with pytest.raises(ValueError, match="not a pickle of protocol 2-5"):
        mf.read_pickle(tmp_path / "p0.pkl")


# --------------------------------------------------------------------------------------------
# The table


def test_mean_and_sample_std_and_table():
    values = [96.0, 100.0, 91.0, 98.0]
    mean, std = fewshot.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))  # sample std, n - 1
    assert std != pytest.approx(statistics.pstdev(values))
    assert np.isnan(fewshot.mean_std([90.0])[1])
    runs = {(5, 10): [{"fold": f, "best_acc": b, "last_acc": b - 1} for f, b in enumerate(values)],
            (7, 3): [{"fold": 0, "best_acc": 50.0, "last_acc": 40.0}]}
    summary, table = fewshot.summarize(runs, "full")
    assert "mean +- SAMPLE std (n-1)" in table.splitlines()[0]
    assert "best epoch (test-set selection)" in table.splitlines()[1]
    row = table.splitlines()[2]
    assert row.startswith("5-way 10-shot") and f"{mean:.2f} +- {std:.2f}" in row
    assert f"{mean - 1:.2f} +- {std:.2f}" in row and row.endswith("96.9 +- 3.2")
    single = table.splitlines()[3]  # one fold: no sample std; no paper number for 7-way 3-shot
    assert "50.00 +- n/a" in single and "40.00 +- n/a" in single and single.endswith(" -")
    assert summary["5way_10shot"]["best_acc_std"] == pytest.approx(std)
    assert summary["5way_10shot"]["paper_mean"] == 96.9 and summary["7way_3shot"]["paper_mean"] is None


# --------------------------------------------------------------------------------------------
# Resume and subset selection (the fold runner replaced by a recorder)


def test_finished_folds_are_skipped_and_killed_folds_resume(tmp_path, monkeypatch):
    calls = []

    def fake_run(fold_cfg):
        calls.append((fold_cfg.data_path, fold_cfg.resume))
        acc = 90.0 + len(calls)
        result = {"config": dataclasses.asdict(fold_cfg), "best_acc": acc, "best_epoch": 3,
                  "last_acc": acc - 2}
        Path(fold_cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(fold_cfg.out_dir) / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(fewshot, "run_fold", fake_run)
    cfg = fewshot.Config(data_dir=str(tmp_path / "episodes"), ways=(5,), shots=(10, 20),
                         folds=(0, 2), out_dir=str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="data_prep.modelnet_fewshot"):
        fewshot.main(cfg)
    for shot in (10, 20):
        for fold in (0, 2):
            p = mf.episode_path(cfg.data_dir, 5, shot, fold)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    first = fewshot.main(cfg)
    assert [Path(c[0]).relative_to(cfg.data_dir).as_posix() for c in calls] == [
        "5way_10shot/0.h5", "5way_10shot/2.h5", "5way_20shot/0.h5", "5way_20shot/2.h5"]
    assert first["settings"]["5way_10shot"]["best_acc_mean"] == pytest.approx(91.5)
    assert (tmp_path / "runs" / "fewshot_table.txt").read_text() == first["table"] + "\n"

    # Without --resume, the run is refused and left as it was.
    with pytest.raises(ValueError, match="already holds a run"):
        fewshot.main(cfg)
    # A second invocation with --resume re-runs nothing and gives the same table.
    cfg = dataclasses.replace(cfg, resume=True)
    assert fewshot.main(cfg)["table"] == first["table"] and len(calls) == 4
    # A fold killed halfway (ckpt-last, no results.json) is resumed; the others are skipped.
    run_dir = fewshot.fold_dir(cfg.out_dir, 5, 20, 2)
    (run_dir / "results.json").unlink()
    (run_dir / "ckpt-last").mkdir()
    (run_dir / "ckpt-last" / "meta.json").write_text('{"step": 3}')
    ckpt.save_weights(run_dir / "ckpt-last" / "model.safetensors", {"w": torch.zeros(2)})
    fewshot.main(cfg)
    assert calls[4:] == [(str(mf.episode_path(cfg.data_dir, 5, 20, 2)), True)]
    assert not (run_dir / "ckpt-last").exists()  # removed once finished (keep_checkpoints off)
    # A result written under another fine-tuning config is refused, not mixed in.
    changed = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lr=1e-3))
    with pytest.raises(ValueError, match=r"config fields differ: \['lr'\]"):
        fewshot.main(changed)


# --------------------------------------------------------------------------------------------
# Real folds through finetune_cls


def toy_episode(root: Path, fold: int) -> None:
    """A 2-way 8-shot episode (ellipsoids vs boxes, 4 test shapes each) at 8192 points, the
    loader's size."""
    points, labels = data.procedural_classes(24, data.MODELNET40_POINTS, num_classes=2, seed=fold)
    split = lambda s: (points[s].numpy(), labels[s].numpy(), labels[s].numpy() + 10)  # noqa: E731
    mf.write_episode(mf.episode_path(root, 2, 8, fold),
                     {"train": split(slice(0, 16)), "test": split(slice(16, 24))}, 2, 8, fold, "toy")


def test_one_tiny_fold_end_to_end(tmp_path):
    toy_episode(tmp_path / "episodes", 0)
    cfg = dataclasses.replace(fewshot.PRESETS["tiny"], data_dir=str(tmp_path / "episodes"),
                              ways=(2,), shots=(8,), folds=(0,), out_dir=str(tmp_path / "runs"))
    out = fewshot.main(cfg)
    result = json.loads((fewshot.fold_dir(cfg.out_dir, 2, 8, 0) / "results.json").read_text())
    assert result["config"]["augment"] == "rotate" and result["config"]["num_classes"] == 40
    assert result["test_samples"] == 8
    assert [h["epoch"] for h in result["history"]] == list(range(cfg.finetune.epochs + 1))
    fold = out["folds"]["2way_8shot"][0]
    assert fold["best_acc"] == result["best_acc"] == max(h["acc"] for h in result["history"][1:])
    assert fold["last_acc"] == result["history"][-1]["acc"]
    assert "2-way 8-shot" in out["table"] and f"{fold['best_acc']:.2f} +- n/a" in out["table"]


def test_a_kept_fold_checkpoint_evaluates_to_the_folds_scores(tmp_path):
    """With --keep-checkpoints, `finetune_cls.py --eval-ckpt FOLD/ckpt-best` (and ckpt-last),
    from the checkpoint alone, gives exactly the fold's best_acc (and last_acc): the episode
    file, the 40-way head and "no voting" come with it."""
    from pqae.cli import parse
    toy_episode(tmp_path / "episodes", 0)
    cfg = dataclasses.replace(fewshot.PRESETS["tiny"], data_dir=str(tmp_path / "episodes"),
                              ways=(2,), shots=(8,), folds=(0,), out_dir=str(tmp_path / "runs"),
                              keep_checkpoints=True)
    fold = fewshot.main(cfg)["folds"]["2way_8shot"][0]
    run_dir = fewshot.fold_dir(cfg.out_dir, 2, 8, 0)
    for name, key in (("ckpt-best", "best_acc"), ("ckpt-last", "last_acc")):
        out = fewshot.finetune_cls.main(parse(
            fewshot.finetune_cls.Config, fewshot.finetune_cls.PRESETS,
            ["--eval-ckpt", str(run_dir / name), "--device", "cpu"],
            resolve=fewshot.finetune_cls.resolve))
        assert out["test"]["acc"] == fold[key], name
        assert out["test"]["vote_acc"] is None and out["test"]["test_samples"] == 8
        saved = json.loads((run_dir / f"eval-{name}.json").read_text())
        assert saved["reproduction"]["identical"] is True, saved["reproduction"]


def test_fold_killed_halfway_resumes_to_the_uninterrupted_result(tmp_path):
    toy_episode(tmp_path / "episodes", 0)
    base = dataclasses.replace(fewshot.PRESETS["tiny"], data_dir=str(tmp_path / "episodes"),
                               ways=(2,), shots=(8,), folds=(0,))
    whole = fewshot.main(dataclasses.replace(base, out_dir=str(tmp_path / "whole")))
    # "Kill" a fold after 3 of its 8 steps: a ckpt-last and no results.json are left behind.
    cfg = dataclasses.replace(base, out_dir=str(tmp_path / "killed"))
    fold_cfg = fewshot.fold_config(cfg, 2, 8, 0)
    assert not fold_cfg.resume
    fewshot.finetune_cls.main(dataclasses.replace(fold_cfg, max_steps=3))
    (Path(fold_cfg.out_dir) / "results.json").unlink()
    assert fewshot.fold_config(cfg, 2, 8, 0).resume
    resumed = fewshot.main(cfg)
    # Equal scores; only the train loss/acc of the resumed epoch covers fewer steps.
    strip = lambda folds: {k: [{**f, "history": [h["acc"] for h in f["history"]]} for f in v]  # noqa: E731
                           for k, v in folds.items()}
    assert strip(resumed["folds"]) == strip(whole["folds"])
    history = json.loads((Path(fold_cfg.out_dir) / "results.json").read_text())["history"]
    assert len(history) == cfg.finetune.epochs + 1


def test_preempted_fold_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """SIGTERM during step 3 of fold 0 (of folds 0 and 1): the fold saves and exits 75, the
    few-shot run marks its own out_dir (preempted.json) and starts no other fold; with
    --resume the folds and the table equal the uninterrupted run's, train losses included."""
    for fold in (0, 1):
        toy_episode(tmp_path / "episodes", fold)
    base = dataclasses.replace(fewshot.PRESETS["tiny"], data_dir=str(tmp_path / "episodes"),
                               ways=(2,), shots=(8,), folds=(0, 1))
    whole = fewshot.main(dataclasses.replace(base, out_dir=str(tmp_path / "whole")))
    cfg = dataclasses.replace(base, out_dir=str(tmp_path / "stopped"))
    signal_at(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(preempt.Preempted) as stopped:
        fewshot.main(cfg)
    assert stopped.value.code == 75 and "fold 0" in stopped.value.message
    mark = json.loads((tmp_path / "stopped" / "preempted.json").read_text())
    assert mark["signal"] == "SIGTERM" and "--resume" in mark["resume"]
    assert ckpt.load_meta(fewshot.fold_dir(cfg.out_dir, 2, 8, 0) / "ckpt-last")["step"] == 3
    assert not fewshot.fold_dir(cfg.out_dir, 2, 8, 1).exists()
    monkeypatch.undo()
    resumed = fewshot.main(dataclasses.replace(cfg, resume=True))
    assert resumed["folds"] == whole["folds"] and resumed["table"] == whole["table"]
    assert not (tmp_path / "stopped" / "preempted.json").exists()


def test_two_process_torchrun_runs_every_fold(tmp_path):
    # finetune_cls.main ends its process group; each fold must get a working new one (a hang
    # here is the failure mode, hence the timeout).
    for fold in (0, 1):
        toy_episode(tmp_path / "episodes", fold)
    proc = torchrun_two("fewshot.py", "--preset", "tiny", "--data-dir", tmp_path / "episodes",
                        "--ways", "2", "--shots", "8", "--folds", "0", "1",
                        "--out-dir", tmp_path / "runs", timeout=120)
    assert proc.stdout.count("world 2") == 2  # two fold runs, each on both processes
    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [f["fold"] for f in saved["folds"]["2way_8shot"]] == [0, 1]
    assert proc.stdout.count("Few-shot ModelNet40") == 1  # the table from rank 0 only


def test_tiny_preset_writes_procedural_episodes_and_runs(tmp_path):
    cfg = dataclasses.replace(fewshot.PRESETS["tiny"], data_dir=str(tmp_path / "episodes"),
                              folds=(0,), out_dir=str(tmp_path / "runs"))
    out = fewshot.main(cfg)
    path = mf.episode_path(cfg.data_dir, 5, 10, 0)
    train_points, train_labels = data.load_modelnet40(path, "train")
    test_points, test_labels = data.load_modelnet40(path, "test")
    assert train_points.shape == (50, data.MODELNET40_POINTS, 3) and len(test_labels) == 20
    assert torch.bincount(train_labels).tolist() == [10] * 5  # 10 shots of each of 5 ways
    assert torch.bincount(test_labels).tolist() == [4] * 5
    assert len(out["folds"]["5way_10shot"]) == 1
    assert (tmp_path / "runs" / "fewshot_table.txt").read_text().count("5-way 10-shot") == 1
