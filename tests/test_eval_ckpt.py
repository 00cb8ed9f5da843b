"""--eval-ckpt of a saved model gives exactly (==) the figures its training run reported for the
same weights, for every task, from the checkpoint alone (no preset, no flag but the device);
and where the evaluation is random (part segmentation's test points, S3DIS's test blocks, the
classification vote), its draws follow what the checkpoint records: another epoch or seed
gives other figures, and the output says what differs.

Each test runs on the CPU, and again on CUDA where there is a GPU (Triton kernels): the
figures must be bit-identical on the same device."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import finetune_cls
import partseg
import semseg
from pqae import checkpoint as ckpt
from pqae.cli import parse


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request) -> str:
    return request.param


def eval_ckpt(module, path: Path, *flags: str) -> dict:
    """`python SCRIPT.py --eval-ckpt PATH --device DEVICE FLAGS`, as a user types it, on the
    device the checkpoint was trained on."""
    device = ckpt.load_meta(path)["config"]["device"]
    cfg = parse(module.Config, module.PRESETS, ["--eval-ckpt", str(path), "--device", device,
                                                *flags], resolve=module.resolve)
    return module.main(cfg)


def written(result: dict) -> dict:
    """The eval-NAME.json an --eval-ckpt run wrote."""
    name = Path(result["checkpoint"]).name
    return json.loads((Path(result["config"]["out_dir"]) / f"eval-{name}.json").read_text())


def test_partseg_eval_ckpt_reproduces_the_epoch_it_was_scored_at(tmp_path, device):
    # 40 shapes / batch 4 = 10 steps per epoch, 3 epochs; 10 test shapes of 512 points,
    # evaluated after every epoch on points drawn anew from (seed, epoch).
    cfg = dataclasses.replace(partseg.PRESETS["tiny"], procedural_shapes=40, seed=3,
                              eval_batch_size=4, device=device, out_dir=str(tmp_path / "run"))
    trained = partseg.main(cfg)
    by_epoch = {h["epoch"]: h for h in trained["history"]}
    runs = {}
    for name in ("ckpt-best", "ckpt-last"):
        meta = ckpt.load_meta(tmp_path / "run" / name)
        record = meta["metrics"]["evaluation"]
        assert record["epoch"] == meta["epoch"] and record["step"] == meta["step"]
        assert (record["seed"], record["eval_batch_size"]) == (3, 4)  # brought by --eval-ckpt
        runs[name] = out = eval_ckpt(partseg, tmp_path / "run" / name)
        assert out["epoch"] == meta["epoch"]
        for k in partseg.METRICS:  # exactly, as the run reported them
            assert out["test"][k] == meta["metrics"][k] == by_epoch[meta["epoch"]][k], (name, k)
        check = written(out)["reproduction"]
        assert check["identical"] is True and check["differences"] == [], check
    assert runs["ckpt-last"]["epoch"] == 2  # not epoch 0: the draws the run scored it on
    # Another epoch's test points give other scores, and the output says why.
    other = eval_ckpt(partseg, tmp_path / "run" / "ckpt-last", "--eval-epoch", "0")
    assert other["test"] != runs["ckpt-last"]["test"]
    check = written(other)["reproduction"]
    assert check["identical"] is False and check["differences"] == ["epoch 2 -> 0"]
    assert "random draws are not the recorded ones" in check["note"]
    # Another batch moves the scores by float rounding at most, and is named as such.
    batch = eval_ckpt(partseg, tmp_path / "run" / "ckpt-last", "--eval-batch-size", "8")
    check = written(batch)["reproduction"]
    assert check["differences"] == ["eval_batch_size 4 -> 8"]
    assert check["identical"] or "float rounding" in check["note"]


def test_finetune_eval_ckpt_reproduces_accuracy_and_vote(tmp_path, device):
    cfg = dataclasses.replace(
        finetune_cls.PRESETS["tiny"], num_classes=3, procedural_train=96, procedural_test=45,
        procedural_points=256, num_points=128, num_group=8, group_size=16, dim=32, depth=1,
        heads=2, embed_hidden=16, batch_size=16, lr_full=1e-3, epochs=8, votes=3,
        vote_seed=5, vote_augment="rotate", eval_batch_size=16, seed=2, device=device,
        out_dir=str(tmp_path / "run"))
    trained = finetune_cls.main(cfg)
    best = eval_ckpt(finetune_cls, tmp_path / "run" / "ckpt-best")
    assert best["test"]["acc"] == trained["best_acc"]
    assert written(best)["reproduction"]["identical"] is True
    # ckpt-last holds the final weights: its accuracy and the run's vote test, exactly.
    last = eval_ckpt(finetune_cls, tmp_path / "run" / "ckpt-last")
    assert last["test"]["acc"] == trained["last_acc"]
    assert last["test"]["vote_acc"] == trained["vote_acc"]
    assert last["test"]["vote_acc_max"] == trained["vote_acc_max"]
    check = written(last)["reproduction"]
    assert check["identical"] is True and set(check["recorded"]) == {"acc", "vote_acc",
                                                                     "vote_acc_max"}
    # The vote's seed, batch and transform come from the checkpoint, not the preset's defaults;
    # another seed is named as a difference in the draws.
    used = last["config"]
    assert (used["vote_seed"], used["votes"], used["eval_batch_size"]) == (5, 3, 16)
    other = eval_ckpt(finetune_cls, tmp_path / "run" / "ckpt-last", "--vote-seed", "6")
    if device == "cpu":  # accuracy over 45 shapes is coarse: seen on the CPU, 64.44 vs 66.67 %
        assert other["test"]["vote_acc"] != trained["vote_acc"]
    assert written(other)["reproduction"]["differences"] == ["vote_seed 5 -> 6"]
    assert other["test"]["acc"] == trained["last_acc"]  # the plain test draws nothing


def test_finetune_checkpoint_saved_after_its_evaluation_says_so(tmp_path, device):
    # 96 shapes / 16 = 6 steps per epoch; stopped at step 15, mid-epoch 2: ckpt-last holds
    # step 15's weights with epoch 1's accuracy (step 12), which they cannot reproduce.
    cfg = dataclasses.replace(
        finetune_cls.PRESETS["tiny"], num_classes=3, procedural_train=96, procedural_test=45,
        procedural_points=256, num_points=128, num_group=8, group_size=16, dim=32, depth=1,
        heads=2, embed_hidden=16, batch_size=16, epochs=8, votes=0, max_steps=15,
        device=device, out_dir=str(tmp_path / "run"))
    finetune_cls.main(cfg)
    meta = ckpt.load_meta(tmp_path / "run" / "ckpt-last")
    assert meta["step"] == 15 and meta["metrics"]["evaluation"]["step"] == 12
    check = written(eval_ckpt(finetune_cls, tmp_path / "run" / "ckpt-last"))["reproduction"]
    assert check["identical"] is None and "saved at step 15, after it" in check["note"]


def test_semseg_eval_ckpt_reproduces_blocks_and_whole_rooms(tmp_path, device):
    cfg = dataclasses.replace(semseg.PRESETS["tiny"], procedural_rooms=6, eval_blocks=16,
                              epochs=3, test_rooms=True, seed=1, device=device,
                              out_dir=str(tmp_path / "run"))
    trained = semseg.main(cfg)
    by_epoch = {h["epoch"]: h for h in trained["history"]}
    for name in ("ckpt-best", "ckpt-last"):
        meta = ckpt.load_meta(tmp_path / "run" / name)
        out = eval_ckpt(semseg, tmp_path / "run" / name)  # reference preset: 3 votes, all blocks
        assert out["epoch"] == meta["epoch"] and out["config"]["eval_blocks"] == 16
        for k in semseg.SCORES:
            assert out["blocks"][k] == meta["metrics"][k] == by_epoch[meta["epoch"]][k], (name, k)
        assert written(out)["reproduction"]["blocks"]["identical"] is True
    # The whole-room test of --test-rooms ran on ckpt-best's weights: the same, exactly.
    best = eval_ckpt(semseg, tmp_path / "run" / "ckpt-best")
    for k in semseg.SCORES:
        assert best["test"][k] == trained["test"][k], k
    assert written(best)["reproduction"]["test"]["identical"] is True
    # Another epoch's blocks give other scores, and the output says why.
    epoch = best["epoch"]
    other = eval_ckpt(semseg, tmp_path / "run" / "ckpt-best", "--eval-epoch", str(epoch + 1))
    assert [other["blocks"][k] for k in semseg.SCORES[:3]] != \
        [best["blocks"][k] for k in semseg.SCORES[:3]]
    check = written(other)["reproduction"]["blocks"]
    assert check["identical"] is False and check["differences"] == [f"epoch {epoch} -> {epoch + 1}"]
    assert other["test"] == best["test"]  # the whole-room test does not depend on the epoch
