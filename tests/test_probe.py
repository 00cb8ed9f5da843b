"""The embedding API (pqae.load_encoder / embed) and the frozen-feature probe (pqae.probe),
alone and inside pretraining."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pqae
import pretrain
from conftest import ROOT, small_pretrain_config
from pqae import checkpoint as ckpt
from pqae import data
from pqae.classifier import PointClassifier
from pqae.embed import REFERENCE, encoder_config
from pqae.errors import UserError
from pqae.model import PointPQAE
from pqae.probe import knn_probe, linear_probe


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly pretrained small encoder (procedural shapes, 64 steps) and its checkpoint."""
    tmp = tmp_path_factory.mktemp("pre")
    cfg = small_pretrain_config(tmp, procedural_shapes=256, num_points=256, num_group=16,
                                group_size=16, batch_size=32, epochs=7, warmup_epochs=0,
                                log_every=100)
    out = pretrain.main(cfg)
    assert out["step"] == 64
    return cfg, tmp / "run" / "ckpt-final"


def test_embed_equals_the_classifier_features(pretrained):
    cfg, path = pretrained
    encoder = pqae.load_encoder(path)
    assert not encoder.training and encoder.dim == 2 * cfg.dim
    assert (encoder.num_points, encoder.num_group, encoder.group_size) == (256, 16, 16)
    classifier = PointClassifier(num_classes=5, num_group=cfg.num_group, group_size=cfg.group_size,
                                 dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                 embed_hidden=cfg.embed_hidden)
    classifier.load_pretrained(path)
    classifier.eval()
    raw, _ = data.procedural_classes(6, 700, seed=3)
    raw = raw * 3.0 + torch.tensor([1.0, -2.0, 0.5])  # off-centre and larger than the unit sphere
    prepared = encoder.prepare(raw)
    assert prepared.shape == (6, 256, 3)  # FPS down to the pretraining point count
    assert prepared.mean(1).abs().max() < 1e-5
    assert torch.allclose(prepared.norm(dim=2).amax(1), torch.ones(6))
    with torch.no_grad():
        expected = classifier.features(prepared)
    features = encoder.embed(raw)
    assert features.shape == (6, 2 * cfg.dim)
    assert torch.allclose(features, expected, atol=1e-5)
    assert torch.equal(encoder.embed(raw, batch_size=4), encoder.embed(raw))  # batching
    small = encoder.embed(raw[:, :100])  # fewer points than the pretraining count: all used
    assert small.shape == (6, 2 * cfg.dim)
    with pytest.raises(UserError, match="fewer than the 16 patches"):
        encoder.embed(raw[:, :10])


def test_load_encoder_reads_converted_checkpoints_and_rejects_others(tmp_path):
    torch.manual_seed(0)
    model = PointPQAE(dim=48, depth=2, heads=REFERENCE["heads"], decoder_depth=1, embed_hidden=16)
    ckpt.save_weights(tmp_path / "ref.safetensors", model.state_dict())  # no config: reference
    config = encoder_config(tmp_path / "ref.safetensors")
    assert config == {**REFERENCE, "dim": 48, "depth": 2, "embed_hidden": 16}
    encoder = pqae.load_encoder(tmp_path / "ref.safetensors")
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(encoder.encoder.state_dict()[k], v), k
    # A fine-tuned classifier is not a pretraining checkpoint; a random file holds no encoder.
    classifier = PointClassifier(num_classes=3, dim=48, depth=2, heads=6, embed_hidden=16)
    ckpt.save_weights(tmp_path / "cls.safetensors", classifier.state_dict())
    with pytest.raises(UserError, match="not a pretraining checkpoint.*cls_head"):
        pqae.load_encoder(tmp_path / "cls.safetensors")
    ckpt.save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(UserError, match="holds no point encoder"):
        pqae.load_encoder(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        pqae.load_encoder(tmp_path / "missing")


def test_probes_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y_train, y_test = torch.arange(200) % 4, torch.arange(80) % 4
    x_train = centres[y_train] + torch.randn(200, 16, generator=g)
    x_test = centres[y_test] + torch.randn(80, 16, generator=g)
    linear = linear_probe(x_train, y_train, x_test, y_test, (1e-4, 1e-2, 10.0), 3, 0)
    assert linear["acc"] > 95 and set(linear["cv_acc"]) == {"0.0001", "0.01", "10.0"}
    assert linear["cv_acc"]["10.0"] < linear["cv_acc"][str(linear["l2"])]  # chosen on train CV
    knn = knn_probe(x_train, y_train, x_test, y_test, (1, 20))
    assert knn[1] > 90 and knn[20] > 90
    noise = knn_probe(torch.randn(200, 16, generator=g), y_train, torch.randn(80, 16, generator=g),
                      y_test, (1,))
    assert noise[1] < 50  # chance is 25


def probe_cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "pqae.probe", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_pretrained_encoder_beats_a_random_one(pretrained, tmp_path):
    _, path = pretrained
    common = ["--data", "procedural", "--procedural-train", "150", "--procedural-test", "100",
              "--device", "cpu"]
    out = probe_cli("--ckpt", str(path), *common, "--save-embeddings", str(tmp_path / "e.npz"),
                    cwd=tmp_path)
    assert "linear" in out and "k-NN@1" in out
    ours = json.loads((path.parent / "probe-ckpt-final-procedural.json").read_text())
    probe_cli("--ckpt", "random", "--like", str(path), *common, cwd=tmp_path)
    random = json.loads((tmp_path / "runs" / "probe" / "probe-random-procedural.json").read_text())
    assert ours["encoder_settings"] == random["encoder_settings"]  # the same shape and grouping
    assert ours["knn1_acc"] > random["knn1_acc"] + 5, (ours, random)
    assert ours["linear_acc"] > random["linear_acc"], (ours, random)
    saved = np.load(tmp_path / "e.npz")
    assert saved["train_features"].shape == (150, ours["encoder_settings"]["feature_dim"])
    assert saved["test_labels"].shape == (100,)


def test_pretraining_probes_every_n_epochs(tmp_path):
    cfg = small_pretrain_config(tmp_path, probe_data="procedural", probe_every=2)
    out = pretrain.main(cfg)  # 3 loop epochs: probed after epochs 0 and 2
    probes = [h for h in out["history"] if "probe_linear_acc" in h]
    assert [h["epoch"] for h in probes] == [0, 2]
    assert 0 <= probes[-1]["probe_linear_acc"] <= 100 and probes[-1]["probe_s"] > 0
    meta = ckpt.load_meta(tmp_path / "run" / "ckpt-final")
    assert meta["metrics"]["probe_knn_acc"] == probes[-1]["probe_knn_acc"]
    # The probe changes nothing in training: the losses are those of a run without it.
    plain = pretrain.main(dataclasses.replace(cfg, probe_every=0, out_dir=str(tmp_path / "plain")))
    assert [h["loss"] for h in out["history"] if "loss" in h] == [h["loss"] for h in plain["history"]]


def test_collapse_statistics_tell_one_patch_from_many():
    from pqae import collapse
    g = torch.Generator().manual_seed(0)
    target = torch.randn(64, 16, 3, generator=g) * 0.1 + torch.randn(64, 1, 3, generator=g) * 0.3
    one = target.mean(0, keepdim=True).expand(64, -1, -1)  # the same patch everywhere
    stuck = collapse.stats({"pred1": one, "neighborhood1": target, "pred2": one, "neighborhood2": target})
    assert stuck["spread_ratio"] < 1e-6
    assert stuck["constant_loss"] <= stuck["loss_sample"]  # fitted from the mean prediction
    assert collapse.collapsed(stuck)
    good = collapse.stats({"pred1": target, "neighborhood1": target, "pred2": target + 0.01,
                           "neighborhood2": target})
    assert good["spread_ratio"] == pytest.approx(1.0, abs=0.01) and good["loss_sample"] < 0.01
    assert good["constant_loss"] > 10 * good["loss_sample"] and not collapse.collapsed(good)


def test_pretraining_logs_the_constant_solution_and_warns(tmp_path, capsys):
    out = pretrain.main(small_pretrain_config(tmp_path, log_every=2))
    rows = [h for h in out["history"] if "loss" in h]
    assert all(h["constant_loss"] > 0 and h["spread_ratio"] >= 0 for h in rows)
    printed = capsys.readouterr().out
    assert "| const " in printed and "| spread " in printed
    # This tiny run sits at the constant solution after its warm-up (prediction spread ~1e-3 of
    # the targets'), and says so.
    assert rows[-1]["spread_ratio"] < collapse_threshold()
    assert "warning: the decoder predicts one patch everywhere" in printed


def collapse_threshold() -> float:
    from pqae import collapse
    return collapse.SPREAD_RATIO
