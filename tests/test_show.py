"""python -m pqae.show: every model gives coloured clouds to look at (.ply and .png) from its
checkpoint alone, with the colours meaning what they say; pretraining also logs the picture
to TensorBoard."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import partseg
import pretrain
import semseg
from conftest import ROOT, small_pretrain_config
from pqae import shapenetpart as spart
from pqae import show

plyfile = pytest.importorskip("plyfile")
pytest.importorskip("matplotlib")


def _ply(path) -> tuple[np.ndarray, np.ndarray]:
    v = plyfile.PlyData.read(str(path))["vertex"]
    return (np.stack([v[c] for c in "xyz"], 1),
            np.stack([v[c] for c in ("red", "green", "blue")], 1))


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    result = pretrain.main(small_pretrain_config(out, max_steps=2, vis_every=1, epochs=1))
    return out / "run", result


def test_pretraining_shows_view_target_and_reconstruction(pretrained, tmp_path):
    run, _ = pretrained
    r = show.main(show.Config("pretrain", str(run / "ckpt-final"), out_dir=str(tmp_path),
                              shapes=2))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["shape-0.png", "shape-1.png"]
    assert all(_is_png(p) for p in tmp_path.glob("*.png"))
    view, grey = _ply(tmp_path / "shape-0-view_1.ply")
    target, blue = _ply(tmp_path / "shape-0-target_patches.ply")
    pred, orange = _ply(tmp_path / "shape-0-reconstruction.ply")
    # 16 patches of 16 points each, coloured as the legend says
    assert target.shape == pred.shape == (16 * 16, 3) and len(view) <= 256
    assert (grey == show.GREY).all() and (blue == show.BLUE).all() and (orange == show.ORANGE).all()
    # the target patches are points of the view (placed back at their centres)
    d = torch.cdist(torch.from_numpy(target), torch.from_numpy(view),
                    compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(d.max()) < 1e-5
    assert len(r["files"]) == 2 * 4


def test_pretraining_logs_the_picture_to_tensorboard(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = pretrained
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    images = acc.Images("clouds/view1_reconstruction")
    assert [i.step for i in images] == [1, 2] and images[0].width > 100  # after steps 1, 2


def test_part_segmentation_shows_predicted_and_true_parts(tmp_path):
    cfg = dataclasses.replace(partseg.PRESETS["tiny"], out_dir=str(tmp_path / "run"),
                              device="cpu", epochs=1, procedural_shapes=16)
    partseg.main(cfg)
    out = tmp_path / "show"
    show.main(show.Config("partseg", str(tmp_path / "run" / "ckpt-best"), out_dir=str(out),
                          shapes=2, seed=5))
    assert _is_png(out / "shape-1.png")
    xyz, true_rgb = _ply(out / "shape-0-true_parts.ply")
    _, errors = _ply(out / "shape-0-errors.ply")
    _, pred_rgb = _ply(out / "shape-0-predicted_parts.ply")
    # the true colours are the palette of the labels of exactly these points
    _, test = partseg.load_data(cfg)
    u = torch.rand(2, cfg.num_points, generator=torch.Generator().manual_seed(5))
    points, labels = test.sample(torch.arange(2), u)
    assert np.allclose(xyz, points[0].numpy())
    colours = show.palette(spart.NUM_CLASSES)
    assert (true_rgb == colours[labels[0].numpy()]).all()
    wrong = (pred_rgb != true_rgb).any(1)
    assert ((errors == show.RED).all(1) == wrong).all()


def test_semantic_segmentation_shows_a_whole_room(tmp_path):
    cfg = dataclasses.replace(semseg.PRESETS["tiny"], out_dir=str(tmp_path / "run"),
                              device="cpu", epochs=1)
    semseg.main(cfg)
    out = tmp_path / "show"
    show.main(show.Config("semseg", str(tmp_path / "run" / "ckpt-best"), out_dir=str(out),
                          shapes=1))
    _, test = semseg.load_data(cfg)
    xyz, labels = test.room(0)
    got, truth = _ply(out / "room-0-ground_truth.ply")
    _, pred = _ply(out / "room-0-prediction.ply")
    assert len(got) == len(xyz)  # the whole room, every point
    assert (truth == show.palette(13)[labels.numpy()]).all()
    saved = np.loadtxt(out / "predictions" / f"{test.names[0]}.txt", dtype=np.int64)
    assert (pred == show.palette(13)[saved]).all()  # the whole-room test's own labels


def test_features_are_coloured_by_their_principal_components(pretrained, tmp_path):
    run, _ = pretrained
    show.main(show.Config("features", str(run / "ckpt-final"), out_dir=str(tmp_path)))
    centres, rgb = _ply(tmp_path / "shape-0-patch_centres.ply")
    assert len(centres) == 16 and len(np.unique(rgb, axis=0)) > 8
    # three well-separated groups of features get three different colours
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(m, 0.01, (10, 8)) for m in (-1.0, 0.0, 1.0)])
    feats[10:20, 3] += 2  # the middle group apart on another axis too
    c = show.pca_colours(feats).astype(int)
    groups = [c[i * 10:(i + 1) * 10].mean(0) for i in range(3)]
    assert min(np.abs(a - b).sum() for i, a in enumerate(groups) for b in groups[i + 1:]) > 60


def test_the_command_line(pretrained, tmp_path):
    run, _ = pretrained
    p = subprocess.run([sys.executable, "-m", "pqae.show", "pretrain", "--ckpt",
                        str(run / "ckpt-final"), "--out-dir", str(tmp_path), "--shapes", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "done | 4 files in" in p.stdout and (tmp_path / "shape-0.png").is_file()
    p = subprocess.run([sys.executable, "-m", "pqae.show", "partseg", "--ckpt",
                        str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "no such checkpoint" in p.stderr
