"""S3DIS (§6): the raw-tree converter, block sampling, the whole-room cover, the metrics, and
semseg.py end to end on procedural rooms (train, per-epoch evaluation, whole-room test)."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import semseg
from conftest import (ROOT, HostToDeviceCopies, NoOpOptimizer, preempted_then_resumed,
                      torchrun_two)
from data_prep import s3dis as prep
from pqae import checkpoint as ckpt
from pqae import s3dis

OFFSET = np.array([10.0, -4.0, 1.5])  # raw rooms are not at the origin


def write_raw_tree(root: Path, rooms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write rooms (N, 7) in the release layout Area_k/<room>/Annotations/<class>_<i>.txt, with
    the chair points renamed to an unknown class ("stairs") and one malformed ceiling line.
    Returns the rooms as the converter should produce them (row order: files sorted by name)."""
    expected = {}
    for name, room in rooms.items():
        area, room_name = name.split("_")[1], "_".join(name.split("_")[2:])
        ann = root / f"Area_{area}" / room_name / "Annotations"
        ann.mkdir(parents=True)
        files = {}
        for c in np.unique(room[:, 6]).astype(int):
            cls = "stairs" if s3dis.CLASSES[c] == "chair" else s3dis.CLASSES[c]
            label = s3dis.CLUTTER if cls == "stairs" else c
            pts = room[room[:, 6] == c].astype(np.float64)
            pts[:, :3] += OFFSET
            files[f"{cls}_1.txt"] = (pts[:, :6], label)
        rows = []
        for fname in sorted(files):
            pts, label = files[fname]
            lines = [" ".join(f"{v:.6f}" for v in p[:3]) + " " + " ".join(str(int(v)) for v in p[3:])
                     for p in pts]
            if fname.startswith("ceiling"):
                lines.insert(5, "1.5 2.5 3.5 10 20\x10 30")  # the Area_5/hallway_6 kind of defect
            (ann / fname).write_text("\n".join(lines) + "\n", encoding="latin-1")
            rows.append(np.concatenate([np.array([list(map(float, l.split())) for l in lines
                                                  if "\x10" not in l]),
                                        np.full((len(pts), 1), label)], axis=1))
        room_out = np.concatenate(rows)
        room_out[:, :3] -= room_out[:, :3].min(axis=0)
        expected[name] = room_out
    return expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Five procedural rooms (areas 1, 1, 2, 5, 5) through the raw tree and the converter."""
    tmp = tmp_path_factory.mktemp("s3dis")
    rooms = s3dis.procedural_rooms((1, 1, 2, 5, 5), points_per_room=4000, seed=3)
    expected = write_raw_tree(tmp / "raw", rooms)
    report = prep.main(prep.Config(root=tmp / "raw", out=tmp / "s3dis.h5", areas=(1, 2, 5), check_counts=False,
                                   workers=2))
    return tmp / "s3dis.h5", expected, report


def test_converter_shifts_labels_and_reports_bad_lines(converted):
    out, expected, report = converted
    assert sorted(report["rooms"]) == sorted(expected)
    assert report["unknown_classes"] == ["stairs"]
    # One malformed line per room, skipped and reported by file and line number (line 6).
    assert len(report["skipped_lines"]) == len(expected)
    assert all("ceiling_1.txt:6: skipped" in s for s in report["skipped_lines"])
    with h5py.File(out) as f:
        assert list(f.attrs["classes"]) == list(s3dis.CLASSES)
        for name, want in expected.items():
            got = f["rooms"][name][()]
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=1e-5)
            assert np.allclose(got[:, :3].min(axis=0), 0)  # room minimum at the origin
            assert s3dis.CLASSES.index("chair") not in got[:, 6]  # became clutter
    test = s3dis.load_rooms(out, (5,))
    assert test.names == ("Area_5_room_3", "Area_5_room_4")
    assert test.sizes() == [len(expected[n]) for n in test.names]


def test_converter_fails_on_a_room_without_annotations(tmp_path):
    (tmp_path / "raw" / "Area_1" / "office_1").mkdir(parents=True)
    out = tmp_path / "s.h5"
    with pytest.raises(prep.ConversionError, match="office_1: no Annotations"):
        prep.main(prep.Config(root=tmp_path / "raw", out=out, areas=(1,), workers=1,
                              check_counts=False))
    assert not out.exists() and not out.with_name("s.h5.tmp").exists()


def test_block_sampling_invariants():
    torch.manual_seed(0)
    room = s3dis.make_rooms(s3dis.procedural_rooms((1,), points_per_room=30000, seed=1), "syn")
    xyz, labels = room.room(0)
    for _ in range(10):
        idx, pts, fallback = s3dis.sample_block(xyz)
        assert pts.shape == (2048, 3) and idx.shape == (2048,) and not fallback
        assert (pts[:, :2].abs() <= 0.5 + 1e-6).all()  # xy relative to the block centre
        centre = xyz[idx, :2] - pts[:, :2]
        assert torch.allclose(centre, centre[0].expand_as(centre), atol=1e-5)
        assert torch.equal(pts[:, 2], xyz[idx, 2])  # z raw
        inside = ((xyz[:, :2] - centre[0]).abs() <= 0.5 + 1e-6).all(dim=1)
        assert inside.sum() > 1024 and inside[idx].all()
        if inside.sum() >= 2048:  # enough points: drawn without replacement
            assert len(idx.unique()) == 2048
    # A sparse room: blocks of 1025..2047 points are sampled with replacement.
    corner = xyz[(xyz[:, :2] < 1.1).all(dim=1)]  # a 1.1 m x 1.1 m piece of the room
    sparse = corner[torch.randperm(len(corner))[:1400]]
    idx, pts, _ = s3dis.sample_block(sparse)
    assert pts.shape == (2048, 3) and len(idx.unique()) < 2048
    assert set(idx.tolist()) <= set(range(len(sparse)))
    with pytest.raises(ValueError, match="no block"):
        s3dis.sample_block(xyz[:500])
    points, labs, fallbacks = s3dis.sample_blocks(room, [0, 0, 0], 256, min_points=64)
    assert points.shape == (3, 256, 3) and labs.shape == (3, 256) and fallbacks == 0


def test_epoch_rooms_and_class_weights():
    slots = s3dis.epoch_rooms([1000, 3000], num_points=100)  # 40 slots, shared 1 : 3
    assert torch.equal(torch.bincount(slots), torch.tensor([10, 30]))
    w = s3dis.class_weights(torch.tensor([0] * 8 + [1] * 1))
    assert w[0] == 1 and w[1] == pytest.approx(2.0) and torch.isinf(w[2:]).all()


def test_whole_room_cover_votes_every_point():
    torch.manual_seed(0)
    rooms = s3dis.make_rooms(s3dis.procedural_rooms((5, 5), points_per_room=3000, seed=2),
                              "procedural")
    narrow = rooms.room(1)[0] * torch.tensor([0.3, 1.0, 1.0])  # under a block wide in x
    for xyz in (rooms.room(0)[0], narrow):
        idx, pts = s3dis.window_chunks(xyz, num_points=512)
        assert idx.shape[1] == 512 and pts.shape == (*idx.shape, 3)
        votes = torch.bincount(idx.flatten(), minlength=len(xyz))
        assert (votes > 0).all()  # every point of the room is in some window
        assert (pts[..., :2].abs() <= 0.5 + 0.001 + 1e-5).all()
        assert torch.equal(pts[..., 2], xyz[idx, 2])


def test_metrics_on_hand_made_predictions():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    conf = s3dis.confusion(pred, target)
    assert conf.sum() == 6 and conf[0, 1] == 1 and conf[1, 2] == 1
    s = s3dis.scores(conf)
    # IoU: class 0 2/3, class 1 1/3, class 2 1/2; the 10 absent classes count 0 (reference).
    assert s["iou"]["ceiling"] == pytest.approx(2 / 3) and s["iou"]["floor"] == pytest.approx(1 / 3)
    assert s["iou"]["wall"] == pytest.approx(1 / 2)
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 13)
    assert s["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 13)
    assert s["oa"] == pytest.approx(4 / 6)  # denominator: the points actually evaluated


def tiny_config(data_path: Path, out_dir: Path, **overrides) -> semseg.Config:
    base = dict(data="s3dis", data_path=str(data_path), num_points=256, min_block_points=64,
                sample_rate=1.0, eval_blocks=8, dim=32, depth=2, heads=2, num_group=16,
                group_size=8, embed_hidden=16, feature_blocks=(1, 2), fp_dims=(32,),
                head_dims=(32, 16), batch_size=8, eval_batch_size=32, lr=1e-3, epochs=2,
                warmup_epochs=0, num_votes=1, device="cpu", log_every=1, out_dir=str(out_dir))
    base.update(overrides)
    return dataclasses.replace(semseg.Config(), **base)


def test_semseg_end_to_end_with_whole_room_test(converted, tmp_path):
    data_path, expected, _ = converted
    cfg = tiny_config(data_path, tmp_path / "run", test_rooms=True)
    result = semseg.main(cfg)
    # 3 train rooms x ~4000 points / 256 = 46 blocks per epoch -> 5 steps of 8, 2 epochs.
    assert result["step"] == 10 and [h["epoch"] for h in result["history"]] == [0, 1]
    assert all(np.isfinite(h["loss"]) and 0 <= h["miou"] <= 100 for h in result["history"])
    run = tmp_path / "run"
    assert ckpt.load_meta(run / "ckpt-best")["metrics"]["miou"] == result["best_miou"]
    # The reference's double step: two AdamW updates per batch.
    state = ckpt.load_resume(run / "ckpt-last")["optimizer"]["state"]
    assert int(next(iter(state.values()))["step"]) == 2 * result["step"]
    # Per-room predictions, one label per point, and the test metrics recomputed from them.
    test = result["test"]
    conf = torch.zeros(13, 13, dtype=torch.long)
    for name in ("Area_5_room_3", "Area_5_room_4"):
        pred = np.loadtxt(run / "test_predictions" / f"{name}.txt", dtype=np.int64)
        assert pred.shape == (len(expected[name]),)
        conf += s3dis.confusion(torch.from_numpy(pred),
                                torch.from_numpy(expected[name][:, 6].astype(np.int64)))
    assert 100 * s3dis.scores(conf)["oa"] == pytest.approx(test["oa"])  # reported in %
    assert 100 * s3dis.scores(conf)["miou"] == pytest.approx(test["miou"])
    saved = json.loads((run / "results.json").read_text())
    assert saved["test"]["miou"] == pytest.approx(test["miou"]) and len(saved["history"]) == 2
    assert saved["best_miou"] == result["best_miou"] and saved["config"]["test_rooms"] is True
    # --eval-ckpt: the whole-room test alone on the saved best weights, same votes.
    again = semseg.main(tiny_config(data_path, tmp_path / "test_only",
                                    eval_ckpt=str(run / "ckpt-best")))
    assert again["test"]["miou"] == pytest.approx(test["miou"])
    assert again["test"]["oa"] == pytest.approx(test["oa"])


def test_resume_matches_uninterrupted_run(converted, tmp_path):
    data_path, _, _ = converted
    small = dict(epochs=2, sample_rate=0.5)  # 21 blocks per epoch -> 2 steps, 4 in all
    full = semseg.main(tiny_config(data_path, tmp_path / "a", **small))
    assert full["step"] == 4
    # Interrupted mid-epoch 0, then resumed through an evaluation and the best checkpoint.
    assert semseg.main(tiny_config(data_path, tmp_path / "b", max_steps=1, **small))["step"] == 1
    resumed = semseg.main(tiny_config(data_path, tmp_path / "b", resume=True, **small))
    assert resumed["step"] == 4
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["miou"] for h in full["history"]] == [h["miou"] for h in resumed["history"]]
    assert full["best_miou"] == resumed["best_miou"]


def test_preempted_run_resumes_to_the_uninterrupted_one(converted, tmp_path, monkeypatch):
    """SIGTERM at step 1, mid-epoch 0: saved, exit 75; resumed, the uninterrupted run's
    weights, history and best."""
    data_path, _, _ = converted
    small = dict(epochs=2, sample_rate=0.5, log_every=2)
    full = semseg.main(tiny_config(data_path, tmp_path / "a", **small))
    resumed = preempted_then_resumed(semseg.main, tiny_config(data_path, tmp_path / "b", **small),
                                     1, signal.SIGTERM, monkeypatch)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["history"] == full["history"] and full["best_miou"] == resumed["best_miou"]


def test_accumulation_splits_the_weighted_loss_exactly(converted, tmp_path):
    """--accum-steps 2: the class-weighted NLL of the global batch is the sum of its
    micro-batches' parts over one denominator, so in eval mode (BatchNorm frozen, no DropPath)
    the update and the reported loss equal the one-batch ones to rounding."""
    from pqae import s3dis as rooms_mod
    data_path, _, _ = converted
    steps = {}
    for k in (1, 2):
        cfg = tiny_config(data_path, tmp_path / str(k), accum_steps=k)
        env = semseg.dist.setup("cpu")
        train, _ = semseg.load_data(cfg)
        weights = rooms_mod.class_weights(train.labels)
        order = rooms_mod.epoch_rooms(train.sizes(), cfg.num_points, cfg.sample_rate)
        model, train_model, _ = semseg.build_training(cfg, env)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # the change is the clipped gradient
        model.eval()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = semseg.make_train_step(cfg, model, train_model, sgd, train, weights, env)(0, order)
        steps[k] = {"out": out, **{n: before[n] - p.detach() for n, p in model.named_parameters()}}
    for name in steps[1]:
        torch.testing.assert_close(steps[2][name], steps[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.s3dis"):
        semseg.main(tiny_config(tmp_path / "none.h5", tmp_path / "run"))


def test_two_process_run_counts_every_point_once(converted, tmp_path):
    # Whole-room test and block evaluation under 2 processes: the summed confusion counts must
    # hold each test point (or evaluated block point) exactly once, and the whole-room scores
    # must equal a single-process test of the same weights.
    data_path, expected, _ = converted
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import sys, json, os\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from pathlib import Path\n"
        "import semseg\n"
        "from test_semseg import tiny_config\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        f"cfg = tiny_config(Path({str(data_path)!r}), tmp / 'run', test_rooms=True, epochs=1,"
        " eval_blocks=7, eval_batch_size=2)\n"
        "r = semseg.main(cfg)\n"
        "if os.environ['RANK'] == '0':\n"
        "    (tmp / 'ddp.json').write_text(json.dumps({'test': r['test'],"
        " 'eval': r['history'][-1]}))\n")
    proc = torchrun_two(script)
    assert "world 2" in proc.stdout
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    test_points = sum(len(v) for k, v in expected.items() if k.startswith("Area_5"))
    assert ddp["test"]["points"] == test_points
    assert ddp["eval"]["points"] == 7 * 256  # 7 blocks in 4 batches of 2 over 2 ranks
    single = semseg.main(tiny_config(data_path, tmp_path / "single",
                                     eval_ckpt=str(tmp_path / "run" / "ckpt-last")))
    for k in ("miou", "macc", "oa", "points"):
        assert single["test"][k] == pytest.approx(ddp["test"][k]), k


def test_nan_stops_and_keeps_last_good_checkpoint(converted, tmp_path):
    # Epochs 0 and 1 warm up at 1e-6; epoch 2 jumps to an absurd lr and diverges.
    data_path, _, _ = converted
    cfg = tiny_config(data_path, tmp_path / "run", lr=1e30, warmup_epochs=2, epochs=4)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        semseg.main(cfg)
    last = tmp_path / "run" / "ckpt-last"
    assert ckpt.load_meta(last)["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in ckpt.load_weights(last).values())


def test_amp_trains_and_tests_whole_rooms(converted, tmp_path):
    """--amp (bf16 autocast in training, block evaluation and the whole-room test): finite
    losses and valid scores; fused AdamW (the default) reaches the optimizer."""
    data_path, _, _ = converted
    result = semseg.main(tiny_config(data_path, tmp_path / "run", amp=True, test_rooms=True))
    assert result["step"] == 10
    assert all(np.isfinite(h["loss"]) and 0 <= h["miou"] <= 100 for h in result["history"])
    assert 0 < result["test"]["oa"] <= 100
    state = ckpt.load_resume(tmp_path / "run" / "ckpt-last")["optimizer"]
    assert all(g["fused"] is True for g in state["param_groups"])


def _room(xy_lo, xy_hi, n, g):
    lo, hi = torch.tensor(xy_lo + [0.0]), torch.tensor(xy_hi + [3.0])
    return lo + (hi - lo) * torch.rand(n, 3, generator=g)


def test_block_sampler_distribution():
    """The sync-free sampler draws what the reference's loop draws: a centre whose block
    qualifies (rejection), a uniform subset of the block without replacement, or uniform
    points with replacement; and it flags the rare room where no candidate qualified."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # Rejection: a dense 1 m cell (3000 points) and a sparse 20 m x 20 m floor (2000 points).
    dense, sparse = _room([0, 0], [1, 1], 3000, g), _room([3, 3], [23, 23], 2000, g)
    xyz = torch.cat([dense, sparse])
    for _ in range(30):
        idx, pts, fallback = s3dis.sample_block(xyz, num_points=512, min_points=1024)
        centre = (xyz[idx, :2] - pts[:, :2])[0]
        inside = ((xyz[:, :2] - centre).abs() <= 0.5).all(dim=1)
        assert not fallback and inside.sum() > 1024 and inside[idx].all()
    # A room that is one block of 300 points: without replacement each point is in a draw of
    # 150 with probability 1/2 (400 draws: 200 +- 10 each); with replacement, 600 draws of the
    # 300 points give each 2 per draw (200 draws: 400 +- 20).
    block = _room([0, 0], [0.5, 0.5], 300, g)
    seen = torch.zeros(300)
    for _ in range(400):
        idx, _, _ = s3dis.sample_block(block, num_points=150, min_points=100)
        assert len(idx.unique()) == 150
        seen[idx] += 1
    assert (seen - 200).abs().max() < 60
    seen.zero_()
    for _ in range(200):
        idx, _, _ = s3dis.sample_block(block, num_points=600, min_points=100)
        seen += torch.bincount(idx, minlength=300)
    assert (seen - 400).abs().max() < 120 and seen.sum() == 200 * 600
    # No 1 m block of a 20 m strip holds 1024 of its 2000 points: the fullest candidate block
    # is taken and flagged.
    strip = _room([0, 0], [20, 1], 2000, g)
    idx, pts, fallback = s3dis.sample_block(strip, num_points=256, min_points=1024)
    centre = (strip[idx, :2] - pts[:, :2])[0]
    assert fallback and ((strip[idx, :2] - centre).abs() <= 0.5).all()


def test_training_step_has_no_host_syncs_or_copies(tmp_path):
    """semseg.py's step (block sampling, augmentation, weighted NLL, double step, clipping) on
    the meta device with HostToDeviceCopies (see conftest): no host sync, no host-to-device
    copy. The room slots of the epoch are a host tensor by design."""
    from pqae import dist

    cfg = tiny_config(tmp_path / "none.h5", tmp_path / "run", min_block_points=64)
    meta = torch.device("meta")
    env = dist.Dist(rank=0, local_rank=0, world_size=1, device=meta)
    sizes = [3000, 5000, 4000]
    rooms = s3dis.Rooms(("a", "b", "c"), torch.empty(sum(sizes), 3, device=meta),
                        torch.empty(sum(sizes), dtype=torch.long, device=meta),
                        (0, 3000, 8000, 12000))
    model = semseg.build_model(cfg).to(meta)
    weights = torch.empty(s3dis.NUM_CLASSES, device=meta)
    step = semseg.make_train_step(cfg, model, model, NoOpOptimizer(), rooms, weights, env)
    order = s3dis.epoch_rooms(sizes, cfg.num_points, cfg.sample_rate)
    with HostToDeviceCopies():
        out = step(0, order)
    assert out.shape == (3,) and out.device == meta
