"""Classification data: ModelNet40 (text tree and pickled caches) and ScanObjectNN converters,
their loaders, and the classification sampling helpers."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, need
from data_prep import modelnet40, scanobjectnn
from pqae import data

SLICE = SHARED_DATA / "modelnet40_airplanes"


# --------------------------------------------------------------------------------------------
# ModelNet40, text tree (the real airplane files)


@pytest.fixture(scope="module")
def modelnet_h5(tmp_path_factory) -> Path:
    root = need(SLICE / "modelnet40_normal_resampled")
    out = tmp_path_factory.mktemp("mn") / "modelnet40.h5"
    modelnet40.main(modelnet40.Config(root=root, out=out, check_counts=False))
    return out


def test_modelnet_text_tree_converts_with_fps(modelnet_h5):
    root = SLICE / "modelnet40_normal_resampled"
    with h5py.File(modelnet_h5) as f:
        assert f["train/points"].shape == (4, 8192, 3) and f["test/points"].shape == (2, 8192, 3)
        assert [n.decode() for n in f["test/names"][()]] == ["airplane_0627", "airplane_0628"]
        raw = f["train/points"][0]
    rows = np.loadtxt(root / "airplane" / "airplane_0001.txt", delimiter=",", dtype=np.float32)
    assert np.array_equal(raw[0], rows[0, :3])  # FPS starts at row 0: deterministic
    # Every kept point is one of the file's rows, and FPS keeps them distinct.
    assert len(np.unique(raw, axis=0)) == 8192
    assert np.isin(raw[:50].view("V12"), rows[:, :3].copy().view("V12")).all()
    points, labels = data.load_modelnet40(modelnet_h5, "train")
    assert labels.tolist() == [0, 0, 0, 0]  # airplane is class 0
    # Unit sphere over all 8192 points (§7.3): centred, max norm 1.
    assert torch.allclose(points.mean(1), torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(points.norm(dim=2).amax(1), torch.ones(4))


def test_modelnet_official_lists_report_missing_files_by_name(tmp_path):
    root = need(SLICE / "modelnet40_normal_resampled")
    cfg = modelnet40.Config(root=root, out=tmp_path / "o.h5",
                            train_list=need(SLICE / "official_modelnet40_train.txt"),
                            test_list=need(SLICE / "official_modelnet40_test.txt"))
    with pytest.raises(modelnet40.ConversionError) as e:
        modelnet40.main(cfg)
    msg = str(e.value)
    assert "train: missing files (9839): airplane_0005 (airplane/airplane_0005.txt)" in msg
    assert "test: missing files (2466)" in msg and "official list" not in msg  # counts are right
    assert not (tmp_path / "o.h5").exists()


def test_modelnet_counts_and_unknown_classes_are_reported(tmp_path):
    root = need(SLICE / "modelnet40_normal_resampled")
    bad_list = tmp_path / "train.txt"
    bad_list.write_text("airplane_0001\nspaceship_0001\n")
    with pytest.raises(modelnet40.ConversionError) as e:
        modelnet40.main(modelnet40.Config(root=root, out=tmp_path / "o.h5", train_list=bad_list))
    msg = str(e.value)
    assert "train: the list has 2 shapes, the official list 9843" in msg
    assert "unknown classes (1): spaceship_0001" in msg
    assert "test: the list has 2 shapes, the official list 2468" in msg


def make_dat_root(tmp_path: Path, clouds: dict[str, list], labels: dict[str, list]) -> Path:
    root = tmp_path / "mn"
    root.mkdir()
    shutil.copy(need(SLICE / "modelnet40_normal_resampled" / "modelnet40_shape_names.txt"), root)
    names = (SLICE / "modelnet40_normal_resampled" / "modelnet40_shape_names.txt").read_text().split()
    for split in ("train", "test"):
        ids = [f"{names[int(lab[0])]}_{i + 1:04d}" for i, lab in enumerate(labels[split])]
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        with open(root / f"modelnet40_{split}_8192pts_fps.dat", "wb") as f:
            pickle.dump([clouds[split], labels[split]], f, protocol=pickle.HIGHEST_PROTOCOL)
    return root


def test_modelnet_dat_caches_convert(tmp_path):
    rng = np.random.default_rng(0)
    clouds = {s: [rng.normal(size=(8192, 6)).astype(np.float32) for _ in range(n)]
              for s, n in (("train", 3), ("test", 1))}
    labels = {"train": [np.array([i], np.int32) for i in (0, 7, 39)], "test": [np.array([5], np.int32)]}
    root = make_dat_root(tmp_path, clouds, labels)
    out = modelnet40.main(modelnet40.Config(root=root, out=tmp_path / "o.h5", source="dat",
                                            check_counts=False))
    with h5py.File(out) as f:
        assert np.array_equal(f["train/points"][1], clouds["train"][1][:, :3])  # normals dropped
        assert f["train/labels"][()].tolist() == [0, 7, 39]
    assert data.load_modelnet40(out, "test")[1].tolist() == [5]


def test_modelnet_dat_refuses_code_and_non_pickles(tmp_path):
    root = make_dat_root(tmp_path, {"train": [], "test": []}, {"train": [], "test": []})
    dat = root / "modelnet40_train_8192pts_fps.dat"
    dat.write_bytes(pickle.dumps([[os.getcwd], []], protocol=2))  # a global that is not NumPy
    cfg = modelnet40.Config(root=root, out=tmp_path / "o.h5", source="dat", check_counts=False)
    with pytest.raises(modelnet40.ConversionError, match=r"refused to load global (posix|nt)\.getcwd"):
        modelnet40.main(cfg)
    dat.write_text("not a pickle")
    with pytest.raises(modelnet40.ConversionError, match="0x80"):
        modelnet40.main(cfg)


def test_modelnet_dat_label_mismatch_is_named(tmp_path):
    clouds = {"train": [np.zeros((8192, 6), np.float32)], "test": [np.zeros((8192, 6), np.float32)]}
    labels = {"train": [np.array([3], np.int32)], "test": [np.array([0], np.int32)]}
    root = make_dat_root(tmp_path, clouds, labels)
    (root / "modelnet40_train.txt").write_text("airplane_0001\n")  # class 0, cache says 3
    cfg = modelnet40.Config(root=root, out=tmp_path / "o.h5", source="dat", check_counts=False)
    with pytest.raises(modelnet40.ConversionError, match=r"labels not matching the list \(1\): "
                                                         r"airplane_0001 \(label 3\)"):
        modelnet40.main(cfg)


# --------------------------------------------------------------------------------------------
# ScanObjectNN


def write_release(path: Path, points, labels, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if points is not None:
            f.create_dataset("data", data=points)
        if labels is not None:
            f.create_dataset("label", data=labels)
        for k, v in extra.items():
            f.create_dataset(k, data=v)


def scan_root(tmp_path: Path, n_train=5, n_test=3, variant="hardest") -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        pts = rng.normal(size=(n, 2048, 3)).astype(np.float32)
        lab = rng.integers(0, 15, size=n).astype(np.uint8)  # the release stores small ints
        arrays[split] = (pts, lab)
        write_release(scanobjectnn.source_files(tmp_path / "scan", variant)[split], pts, lab,
                      mask=np.zeros((n, 2048), np.int64))
    return tmp_path / "scan", arrays


def test_scanobjectnn_converts_and_loads(tmp_path):
    root, arrays = scan_root(tmp_path)
    assert scanobjectnn.source_files(root, "hardest")["train"].name == \
        "training_objectdataset_augmentedrot_scale75.h5"
    out = scanobjectnn.main(scanobjectnn.Config(root=root, variant="hardest", out=tmp_path / "s.h5"))
    for split, (pts, lab) in arrays.items():
        points, labels = data.load_scanobjectnn(out, split)
        assert torch.equal(points, torch.from_numpy(pts))  # no normalisation (§7.2)
        assert labels.dtype == torch.int64 and labels.tolist() == lab.tolist()


@pytest.mark.parametrize("points, labels, match", [
    (np.zeros((2, 1024, 3), np.float32), np.zeros(2, np.int64), r"found `data` \(2, 1024, 3\)"),
    (np.zeros((2, 2048, 3), np.float32), np.array([0, 15]), "out of range, first at sample 1"),
    (np.full((2, 2048, 3), np.nan, np.float32), np.zeros(2, np.int64), "sample 0 contains NaN"),
    (np.zeros((2, 2048, 3), np.float32), None, r"missing \['label'\]"),
])
def test_scanobjectnn_malformed_release_names_file(tmp_path, points, labels, match):
    root, _ = scan_root(tmp_path, variant="objonly")
    bad = scanobjectnn.source_files(root, "objonly")["test"]
    write_release(bad, points, labels)
    with pytest.raises(ValueError, match=match) as e:
        scanobjectnn.main(scanobjectnn.Config(root=root, variant="objonly", out=tmp_path / "s.h5"))
    assert str(bad) in str(e.value)
    assert not (tmp_path / "s.h5").exists()


def test_classification_loaders_reject_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.scanobjectnn"):
        data.load_scanobjectnn(tmp_path / "none.h5", "train")
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("train/points", data=np.zeros((2, 2048, 3), np.float32))
        f.create_dataset("train/labels", data=np.array([0, 40]))
    with pytest.raises(ValueError, match=r"bad.h5: 'train/labels' outside \[0, 15\)"):
        data.load_scanobjectnn(bad, "train")
    with pytest.raises(ValueError, match="bad.h5: expected"):
        data.load_modelnet40(bad, "train")  # 2048 points, not 8192


# --------------------------------------------------------------------------------------------
# Sampling helpers


def test_point_all_and_augmentations():
    assert data.point_all_for(1024, 8192) == 1200 and data.point_all_for(2048, 2048) == 2048
    assert data.point_all_for(8192, 8192) == 8192
    pts = torch.randn(4, 10, 3)
    g = torch.Generator().manual_seed(0)
    params = data.draw_augmentation("scale_translate", 4, g)
    assert params.shape == (4, 6) and (params[:, :3] >= 2 / 3).all() and (params[:, 3:].abs() <= 0.2).all()
    out = data.apply_augmentation("scale_translate", pts, params)
    assert torch.allclose(out, pts * params[:, None, :3] + params[:, None, 3:])
    rot = data.apply_augmentation("rotate", pts, data.draw_augmentation("rotate", 4, g))
    assert torch.allclose(rot.norm(dim=2), pts.norm(dim=2), atol=1e-5)  # a rotation
    assert torch.equal(rot[..., 1], pts[..., 1])  # about y
    with pytest.raises(ValueError, match="augmentation"):
        data.draw_augmentation("flip", 4)


def test_full_fps_indices_pick_what_fps_from_all_points_picks():
    """data.full_fps_indices (fast_point_all) equals FPS from N to N points as a multiset of
    indices, on the cases where FPS's rules bite: duplicate points (ScanObjectNN pads its
    clouds so), points near the origin, point 0 at the origin or repeated, one point N times,
    every point near the origin."""
    from kernels import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 200, 3, generator=g)
    x[1, 50:80] = x[1, 10:40]  # duplicates
    x[2, 100:110] *= 0.001  # near the origin
    x[3, 0] = 0.0  # point 0 at the origin, others there too
    x[3, 190:] = 0.0
    x[4, 150:160] = x[4, 0]  # copies of point 0
    x[5] = x[5, :1].expand(200, 3)  # one point, 200 times
    x[6] *= 0.001  # every point near the origin
    got = data.full_fps_indices(x)
    assert got.shape == (7, 200) and (got[:, 0] == 0).all()
    want = reference.fps(x, 200)
    assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
    assert not torch.equal(got, want)  # only the order differs
