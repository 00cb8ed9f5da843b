"""Part segmentation (§5): converter, loader, metrics, model loading, and partseg.py end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import partseg
from conftest import (ROOT, SHARED_DATA, HostToDeviceCopies, NoOpOptimizer, need,
                      preempted_then_resumed, torchrun_two)
from data_prep import shapenetpart as convert
from pqae import checkpoint as ckpt
from pqae import dist
from pqae import shapenetpart as spart
from pqae.model import TINY_ENCODER
from pqae.segmentation import PointSegmenter, propagate

CAP = SHARED_DATA / "shapenetpart_cap" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"


@pytest.fixture(scope="module")
def cap_h5(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cap") / "cap.h5"
    return convert.main(convert.Config(root=need(CAP), out=out))


def small_config(out_dir: Path, data_path: Path, **overrides) -> partseg.Config:
    """Tiny model on the Cap slice; the slice has no train list, so it trains on test."""
    base = dict(data="shapenetpart", data_path=str(data_path), train_split="test", device="cpu",
                out_dir=str(out_dir), num_points=256, num_group=16, group_size=8, log_every=1)
    base.update(overrides)
    return dataclasses.replace(partseg.PRESETS["tiny"], **base)


# --------------------------------------------------------------------------------------------
# Converter and loader


def test_converter_on_real_cap_shapes(cap_h5):
    with h5py.File(cap_h5, "r") as f:
        for split, n in (("train", 5), ("test", 11)):  # train = trainval = the 5 val shapes
            g = f[split]
            names = [s.decode() for s in g["names"][()]]
            assert len(names) == n and list(g["category"][()]) == [2] * n  # Cap
            rows = [sum(1 for _ in open(CAP / f"{name}.txt")) for name in names]
            assert list(np.diff(g["offsets"][()])) == rows
            assert set(np.unique(g["labels"][()])) == {6, 7}
            first = np.loadtxt(CAP / f"{names[0]}.txt")[:, :3]
            np.testing.assert_allclose(g["points"][: len(first)], first, rtol=1e-6)
        assert names[0] == "02954340/captest00"
    test = spart.load_split(cap_h5, "test")
    assert len(test) == 11 and test.points.shape == (test.offsets[-1], 3)
    seg = test.points[test.offsets[3]:test.offsets[4]]  # one shape: unit sphere over all points
    assert seg.mean(0).abs().max() < 1e-5 and seg.norm(dim=1).max() == pytest.approx(1.0)
    points, labels = test.sample(torch.tensor([0, 10]), torch.rand(2, 4096))
    assert points.shape == (2, 4096, 3) and labels.shape == (2, 4096)
    # Sampling WITH replacement: 4096 draws from ~2,500 points repeat some.
    assert len(torch.unique(points[0], dim=0)) < 4096


def _copy_cap(tmp_path: Path) -> Path:
    root = tmp_path / "cap"
    shutil.copytree(need(CAP), root)
    return root


def test_converter_errors_name_file_line_and_expectation(tmp_path):
    root = _copy_cap(tmp_path)
    bad = root / "02954340" / "captest03.txt"
    lines = bad.read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:6])  # 6 columns on line 5
    bad.write_text("\n".join(lines) + "\n")
    wrong = root / "02954340" / "capval01.txt"
    lines = wrong.read_text().splitlines()
    lines[9] = " ".join(lines[9].split()[:6] + ["12"])  # a Chair part in a Cap, line 10
    wrong.write_text("\n".join(lines) + "\n")
    (root / "02954340" / "captest07.txt").unlink()
    out = tmp_path / "out.h5"
    with pytest.raises(convert.ConversionError) as err:
        convert.main(convert.Config(root=root, out=out))
    msg = str(err.value)
    assert f"{bad} line 5: expected 7 numeric columns" in msg
    assert f"{wrong} line 10: part label 12 is not a part of Cap (expected an integer in 6..7)" in msg
    assert "captest07.txt, not found" in msg
    assert not out.exists() and not out.with_name("out.h5.tmp").exists()
    with pytest.raises(convert.ConversionError, match="synsetoffset2category.txt"):
        convert.main(convert.Config(root=tmp_path, out=out))


def test_loader_errors_name_the_file(tmp_path, cap_h5):
    with pytest.raises(FileNotFoundError, match="data_prep.shapenetpart"):
        spart.load_split(tmp_path / "none.h5", "test")
    bad = tmp_path / "bad.h5"
    shutil.copy(cap_h5, bad)
    with h5py.File(bad, "a") as f:
        labels = f["test/labels"][()]
        labels[5] = 30  # a Motorbike part in a Cap
        f["test/labels"][...] = labels
        del f["train/offsets"]
    with pytest.raises(ValueError, match=r"bad.h5.*captest00 \(Cap\).*6..7"):
        spart.load_split(bad, "test")
    with pytest.raises(ValueError, match=r"bad.h5: expected groups.*lacks \['offsets'\]"):
        spart.load_split(bad, "train")


# --------------------------------------------------------------------------------------------
# Metrics (§5.5)


def test_miou_on_hand_made_predictions():
    cap, chair = spart.PART_START[2], spart.PART_START[4]  # parts 6-7, 12-15
    labels = torch.tensor([[cap, cap, cap + 1, cap + 1],
                           [chair, chair, chair + 1, chair + 1]])
    # The best unrestricted score is a part of another category; restricted, the best Cap /
    # Chair part wins.
    logits = torch.full((2, 4, 50), -5.0)
    logits[:, :, 30] = 10.0  # a Motorbike part everywhere
    logits[0, :, cap] = torch.tensor([3.0, 3.0, 3.0, 0.0])
    logits[0, :, cap + 1] = torch.tensor([0.0, 0.0, 0.0, 3.0])
    logits[1, :, chair] = 3.0
    pred = spart.restricted_argmax(logits, labels)
    assert pred.tolist() == [[cap, cap, cap, cap + 1], [chair] * 4]
    ious = spart.shape_ious(pred, labels)
    # Cap: part 6 2/3, part 7 1/2. Chair: part 12 2/4, 13 0/2, 14 and 15 absent from both: 1.
    assert ious.tolist() == pytest.approx([(2 / 3 + 1 / 2) / 2, (0.5 + 0 + 1 + 1) / 4])
    perfect = spart.shape_ious(labels, labels)
    assert perfect.tolist() == [1.0, 1.0]


def test_class_versus_instance_miou():
    # Three Cap shapes and one Chair: instance = mean of 4, class = mean of 2 category means.
    ious = torch.tensor([0.2, 0.4, 0.6, 1.0])
    category = torch.tensor([2, 2, 2, 4])
    m = spart.summarize(ious, category, correct=30, total=40)
    assert m["instance_miou"] == pytest.approx(0.55)
    assert m["class_miou"] == pytest.approx((0.4 + 1.0) / 2)
    assert m["category_miou"] == pytest.approx({"Cap": 0.4, "Chair": 1.0})
    assert m["acc"] == 0.75


# --------------------------------------------------------------------------------------------
# Model


def test_model_shapes_and_feature_propagation():
    centers = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 2]]])
    feats = torch.arange(8.0).reshape(1, 4, 2)
    # A point on a center takes its feature; the midpoint of two centers (third one farther)
    # gets weights 1/d^2 normalised.
    out = propagate(torch.tensor([[[1.0, 0, 0], [0.5, 0, 0]]]), centers, feats)
    assert torch.allclose(out[0, 0], feats[0, 1])
    w = torch.tensor([4.0, 4.0, 1 / 1.25])
    assert torch.allclose(out[0, 1], (w[:, None] * feats[0, [0, 1, 2]]).sum(0) / w.sum(), atol=1e-4)
    # Reference widths: head inputs 3392 (parts, with category) and 3328 (S3DIS, without).
    # (Three blocks instead of twelve only to build faster; the widths do not depend on depth.)
    short = dict(depth=3, feature_blocks=(1, 2, 3))
    assert PointSegmenter(50, **short).convs1.in_channels == 3392
    s3dis = PointSegmenter(13, num_categories=0, init="trunc_normal", **short)
    assert s3dis.convs1.in_channels == 3328 and not hasattr(s3dis, "label_conv")
    assert not hasattr(s3dis.encoder, "cls_token")  # §5.3: no class token in the backbone
    small = PointSegmenter(50, dim=48, depth=2, heads=2, num_group=8, group_size=8,
                           embed_hidden=16, feature_blocks=(1, 2), fp_dims=(16,),
                           head_dims=(16, 8))
    out = small(torch.randn(3, 64, 3), torch.tensor([0, 2, 15]))
    assert out.shape == (3, 64, 50) and torch.allclose(out.exp().sum(-1), torch.ones(3, 64))


def test_pretrained_encoder_loads_strictly(tmp_path):
    import pretrain
    pcfg = pretrain.Config(**TINY_ENCODER, decoder_depth=1)
    pre = pretrain.build_model(pcfg)
    ckpt.save_checkpoint(tmp_path / "pre", pre, {"step": 0})
    cfg = small_config(tmp_path, tmp_path / "unused.h5")
    model = partseg.build_model(cfg)
    dropped = model.load_pretrained(tmp_path / "pre")
    assert "encoder.cls_token" in dropped and "encoder.cls_pos" in dropped
    assert any(k.startswith("decoder.") for k in dropped) and "head.weight" in dropped
    assert torch.equal(model.encoder.blocks[2].attn.qkv.weight, pre.encoder.blocks[2].attn.qkv.weight)
    state = ckpt.load_weights(tmp_path / "pre")
    state["encoder.extra.weight"] = torch.zeros(1)
    ckpt.save_weights(tmp_path / "bad.safetensors", state)
    with pytest.raises(KeyError, match="extra.weight"):
        model.load_pretrained(tmp_path / "bad.safetensors")


def test_lr_dependent_ten_x_group_and_no_crash_elsewhere(tmp_path):
    model = partseg.build_model(small_config(tmp_path, tmp_path / "unused.h5"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = partseg.build_param_groups(model, 1e-4, 0.05)
    assert [g["lr_scale"] for g in groups] == [10.0, 1.0, 1.0]
    ten_x = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05
    assert "label_conv.1.weight" in ten_x and "propagation.mlp_convs.0.bias" in ten_x
    assert "convs3.weight" in ten_x and "bns1.weight" not in ten_x
    assert not any(n.startswith("encoder.") or "mlp_bns" in n for n in ten_x)
    for lr in (2e-4, 7e-4):  # 7e-4 crashes the reference's builder; here: the two groups
        groups = partseg.build_param_groups(model, lr, 0.05)
        assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
        assert sum(len(g["params"]) for g in groups) == len(names)


# --------------------------------------------------------------------------------------------
# partseg.py end to end


@pytest.mark.parametrize("double_step", [True, False])
def test_double_step_option(tmp_path, cap_h5, double_step):
    cfg = small_config(tmp_path, cap_h5, max_steps=1, double_step=double_step)
    result = partseg.main(cfg)
    steps = {int(s["step"]) for s in result["optimizer"].state_dict()["state"].values()}
    assert steps == ({2} if double_step else {1})  # Adam updates per batch


def test_end_to_end_resume_and_checkpoints(tmp_path, cap_h5):
    # 11 shapes / batch 4 = 2 steps per epoch, 2 epochs = 4 steps, a test pass after each epoch.
    full = partseg.main(small_config(tmp_path / "a", cap_h5, epochs=2))
    assert full["step"] == 4 and [h["epoch"] for h in full["history"]] == [0, 1]
    for h in full["history"]:
        assert 0 <= h["class_miou"] <= 100 and 0 <= h["acc"] <= 100  # in %
        assert h["class_miou"] == pytest.approx(h["instance_miou"])  # one category: equal
    best = full["best_on_test"]
    assert best["instance_miou"] == max(h["instance_miou"] for h in full["history"])
    run = tmp_path / "a"
    assert ckpt.load_meta(run / "ckpt-best")["epoch"] == best["instance_miou_epoch"]
    assert json.loads((run / "config.json").read_text())["double_step"] is True
    assert list((run / "tb").iterdir())
    # Interrupted mid-epoch 1 (step 3 of 4, at another lr), then resumed: identical weights
    # and metrics.
    partseg.main(small_config(tmp_path / "b", cap_h5, epochs=2, max_steps=3))
    resumed = partseg.main(small_config(tmp_path / "b", cap_h5, epochs=2, resume=True))
    assert resumed["history"] == full["history"]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_preempted_run_resumes_to_the_uninterrupted_one(tmp_path, cap_h5, monkeypatch):
    """SIGUSR1 (SLURM's --signal) at step 3, mid-epoch 1: saved, exit 75; resumed, the
    uninterrupted run's weights and history."""
    full = partseg.main(small_config(tmp_path / "a", cap_h5, epochs=2, log_every=2))
    resumed = preempted_then_resumed(
        partseg.main, small_config(tmp_path / "b", cap_h5, epochs=2, log_every=2), 3,
        signal.SIGUSR1, monkeypatch)
    assert resumed["history"] == full["history"]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accumulation_runs_the_double_step_once_per_batch(tmp_path, cap_h5):
    """--accum-steps 2 with the reference's double AdamW step: 2 steps of 2 micro-batches."""
    result = partseg.main(small_config(tmp_path, cap_h5, epochs=1, accum_steps=2))
    assert result["step"] == 2 and math.isfinite(result["history"][-1]["instance_miou"])


def test_two_process_evaluation_counts_each_shape_once(tmp_path, cap_h5):
    # 11 test shapes over 2 processes: shards of 6 and 5, no padding.
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import sys, json, torch\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from pathlib import Path\n"
        "import partseg\n"
        "from pqae import dist, shapenetpart\n"
        "from test_partseg import small_config\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        f"cfg = small_config(tmp / 'run', Path({str(cap_h5)!r}), epochs=1)\n"
        "env = dist.setup('cpu')\n"
        "torch.manual_seed(0)\n"
        "model = partseg.build_model(cfg)\n"
        "test = shapenetpart.load_split(cfg.data_path, 'test')\n"
        "r = partseg.evaluate(model, test, cfg, 0, env)\n"
        "torch.save({'ious': r['shape_ious'], 'seen': r['times_seen']},"
        " tmp / f'eval{env.rank}.pt')\n"
        "res = partseg.main(cfg)\n"
        "(tmp / f'main{env.rank}.json').write_text(json.dumps(res['history']))\n")
    proc = torchrun_two(script)
    assert "world 2" in proc.stdout and "(2 per process)" in proc.stdout
    cfg = small_config(tmp_path / "run", cap_h5)
    torch.manual_seed(0)
    one = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    single = partseg.evaluate(partseg.build_model(cfg), spart.load_split(cap_h5, "test"), cfg, 0,
                              one)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"eval{rank}.pt")
        assert got["seen"].tolist() == [1.0] * 11
        assert torch.allclose(got["ious"], single["shape_ious"], atol=1e-12)
    # Training under DDP: both ranks report the same test metrics (shared BN statistics).
    h0, h1 = (json.loads((tmp_path / f"main{r}.json").read_text()) for r in (0, 1))
    assert len(h0) == 1 and h0 == h1


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, cap_h5):
    # Epochs 0 and 1 warm up at 1e-6; epoch 2 jumps to an absurd lr and diverges.
    cfg = small_config(tmp_path / "run", cap_h5, lr=1e30, warmup_epochs=2, epochs=4)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        partseg.main(cfg)
    last = tmp_path / "run" / "ckpt-last"
    assert ckpt.load_meta(last)["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in ckpt.load_weights(last).values())


def test_procedural_parts_and_tiny_preset(tmp_path):
    split = spart.procedural_split(20, num_points=64, seed=0)
    assert len(split) == 20 and split.points.shape == (20 * 64, 3)
    assert (split.offsets[1:] - split.offsets[:-1]).eq(64).all()
    for s in range(20):
        rows = slice(int(split.offsets[s]), int(split.offsets[s + 1]))
        cat = int(split.category[s])
        start = spart.PART_START[cat]
        assert spart.NUM_PARTS[cat] == 2  # two primitives, two parts
        assert split.labels[rows].tolist() == [start] * 32 + [start + 1] * 32
        norms = split.points[rows].norm(dim=1)
        assert norms.max() == pytest.approx(1.0, abs=1e-5)  # unit sphere
        assert split.points[rows].mean(0).abs().max() < 1e-5
    assert torch.equal(spart.procedural_split(20, 64, seed=0).points, split.points)
    # The tiny preset as shipped (3 epochs of 160 shapes, ~6 s): it learns the parts.
    cfg = dataclasses.replace(partseg.PRESETS["tiny"], out_dir=str(tmp_path / "run"),
                              device="cpu")
    result = partseg.main(cfg)
    assert len(result["history"]) == 3
    # One part everywhere scores ~25-33 % instance mIoU; seen: 64 % after 3 epochs.
    assert result["history"][-1]["instance_miou"] > 55


def test_test_checkpoint_reproduces_the_epoch_evaluation(tmp_path, cap_h5):
    # One epoch: evaluated at its end (test points drawn for epoch 0), then ckpt-last written.
    # Testing ckpt-last alone must give exactly those metrics.
    trained = partseg.main(small_config(tmp_path / "run", cap_h5, epochs=1))
    tested = partseg.main(small_config(tmp_path / "test", cap_h5,
                                       eval_ckpt=str(tmp_path / "run" / "ckpt-last")))
    for k in ("acc", "class_miou", "instance_miou"):
        assert tested["test"][k] == trained["history"][0][k], k
    with pytest.raises(FileNotFoundError):
        partseg.main(small_config(tmp_path / "x", cap_h5, eval_ckpt=str(tmp_path / "no")))


def test_bf16_autocast_stays_close_to_float32():
    """The segmenter under bf16 autocast (--amp) predicts per-point part probabilities within
    0.05 of float32's (eval mode, same weights), and not identical ones."""
    torch.manual_seed(0)
    model = PointSegmenter(50, dim=48, depth=2, heads=2, num_group=8, group_size=8,
                           embed_hidden=16, feature_blocks=(1, 2), fp_dims=(16,),
                           head_dims=(16, 8)).eval()
    points, category = torch.randn(3, 64, 3), torch.tensor([0, 2, 15])
    with torch.no_grad():
        p32 = model(points, category).exp()
        with torch.autocast("cpu", torch.bfloat16):
            p16 = model(points, category).float().exp()
    assert not torch.equal(p16, p32)
    assert (p16 - p32).abs().max().item() < 0.05


def test_amp_and_compile_options_train_and_evaluate(tmp_path, cap_h5):
    """--amp: two epochs train and evaluate with finite numbers. --compile: a step through the
    compiled encoder. Fused AdamW (the default) reaches the optimizer."""
    result = partseg.main(small_config(tmp_path / "amp", cap_h5, epochs=2, amp=True))
    assert result["step"] == 4 and result["optimizer"].defaults["fused"] is True
    for h in result["history"]:
        assert math.isfinite(h["instance_miou"]) and 0 <= h["instance_miou"] <= 100 and h["acc"] > 0
    compiled = partseg.main(small_config(tmp_path / "compile", cap_h5, max_steps=1, compile=True))
    assert compiled["model"].encoder._compiled_call_impl is not None
    assert compiled["step"] == 1


def test_training_step_has_no_host_syncs_or_copies(tmp_path, cap_h5):
    """partseg.py's step (sampling, augmentation, NLL, double step, clipping) on the meta
    device with HostToDeviceCopies (see conftest): no host sync, no host-to-device copy."""
    from pqae import dist

    cfg = small_config(tmp_path, cap_h5)
    meta = torch.device("meta")
    env = dist.Dist(rank=0, local_rank=0, world_size=1, device=meta)
    S, P = 12, 12 * 500
    train = spart.PartSplit(torch.empty(P, 3, device=meta),
                            torch.empty(P, dtype=torch.long, device=meta),
                            torch.empty(S + 1, dtype=torch.long, device=meta),
                            torch.empty(S, dtype=torch.long, device=meta), ["x"] * S)
    model = partseg.build_model(cfg).to(meta)
    step = partseg.make_train_step(cfg, model, model, NoOpOptimizer(), train, env)
    with HostToDeviceCopies():
        out = step(1, torch.empty(S, dtype=torch.long, device=meta))
    assert out.shape == (3,) and out.device == meta
