"""Reference segmentation checkpoints (`best_model.pth` of the reference's part and semantic
segmentation scripts) convert, load strictly and give our model's outputs."""

from __future__ import annotations

import pytest
import torch

import partseg
import semseg
from data_prep.convert_checkpoint import Args, main as convert
from pqae.formats import convert_any, detect_layout
from pqae import checkpoint as ckpt
from pqae.segmentation import PointSegmenter

# Our module -> the reference's, written out independently of the converter's table.
ENCODER = {"encoder.patch_embed.fc1.": "encoder.first_conv.0.",
           "encoder.patch_embed.bn1.": "encoder.first_conv.1.",
           "encoder.patch_embed.fc2.": "encoder.first_conv.3.",
           "encoder.patch_embed.fc3.": "encoder.second_conv.0.",
           "encoder.patch_embed.bn2.": "encoder.second_conv.1.",
           "encoder.patch_embed.fc4.": "encoder.second_conv.3.",
           "encoder.pos_embed.fc1.": "pos_embed.0.", "encoder.pos_embed.fc2.": "pos_embed.2.",
           "encoder.blocks.": "blocks.blocks.", "encoder.norm.": "norm."}
HEAD = ("label_conv.", "propagation.", "convs1.", "convs2.", "convs3.", "bns1.", "bns2.")


def reference_layout(model: PointSegmenter, semantic: bool) -> dict:
    """The state dict as the reference's best_model.pth holds it: DataParallel's `module.`,
    1x1 Conv1d patch embedding weights, `propagation_0`, and (semantic) `_cls` suffixes."""
    out = {}
    for key, value in model.state_dict().items():
        ours = next((o for o in ENCODER if key.startswith(o)), None)
        if ours is not None:
            ref = ENCODER[ours] + key[len(ours):]
            if ours.startswith("encoder.patch_embed.fc") and key.endswith("weight"):
                value = value[..., None]
        else:
            module = next(h for h in HEAD if key.startswith(h))
            name = "propagation_0." if module == "propagation." else module
            if semantic:
                name = name[:-1] + "_cls."
            ref = name + key[len(module):]
        out["module." + ref] = value.clone()
    return out


def small(cfg_module, **kw):
    cfg = cfg_module.Config(dim=48, depth=3, heads=2, num_group=8, group_size=8, embed_hidden=16,
                            feature_blocks=(1, 2, 3), fp_dims=(16, 8), head_dims=(8, 4), **kw)
    torch.manual_seed(0)
    model = cfg_module.build_model(cfg)
    for m in model.modules():  # BatchNorm statistics that are not the defaults
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return cfg, model.eval()


@pytest.mark.parametrize("task", ["partseg", "semseg"])
def test_reference_segmentation_checkpoint_round_trip(tmp_path, task):
    module = partseg if task == "partseg" else semseg
    cfg, model = small(module)
    ref = reference_layout(model, semantic=task == "semseg")
    assert any(k.startswith("module.propagation_0") for k in ref)
    assert ("module.convs1_cls.weight" in ref) == (task == "semseg")
    assert detect_layout(ref) == task
    state, dropped, layout = convert_any(ref)
    assert layout == task and dropped == []
    ckpt.load_strict(model, state)  # every key accounted for, every shape right
    # The file the reference writes, through the command-line converter.
    pth = tmp_path / "best_model.pth"
    torch.save({"epoch": 3, "model_state_dict": ref, "optimizer_state_dict": {}}, pth)
    convert(Args(src=str(pth), dst=str(tmp_path / "conv.safetensors")))
    fresh = module.build_model(cfg).eval()
    ckpt.load_strict(fresh, ckpt.load_weights(tmp_path / "conv.safetensors"))
    points = torch.randn(2, 64, 3)
    args = (points, torch.tensor([0, 3])) if task == "partseg" else (points,)
    with torch.no_grad():
        assert torch.equal(fresh(*args), model(*args))
    # Semantic: the reference's own test loader also takes names without `_cls`.
    if task == "semseg":
        plain = {k.replace("_cls.", "."): v for k, v in ref.items()}
        assert detect_layout(plain) == "semseg"
        assert convert_any(plain)[0].keys() == state.keys()
    # A part segmentation model (it has a category embedding) forced as semseg: refused.
    with pytest.raises(Exception, match="it is a part segmentation model"):
        convert_any(reference_layout(small(partseg)[1], semantic=False), "semseg")


def test_partseg_evaluates_a_reference_checkpoint_like_ours(tmp_path):
    cfg, model = small(partseg, data="procedural", procedural_shapes=16, num_points=128,
                       device="cpu", eval_batch_size=8)
    ours = ckpt.save_checkpoint(tmp_path / "ours", model, {"step": 0})
    pth = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": reference_layout(model, semantic=False)}, pth)
    a = partseg.main(cfg.__class__(**{**cfg.__dict__, "eval_ckpt": str(ours),
                                      "out_dir": str(tmp_path / "a")}))["test"]
    b = partseg.main(cfg.__class__(**{**cfg.__dict__, "eval_ckpt": str(pth),
                                      "out_dir": str(tmp_path / "b")}))["test"]
    assert a == b and a["instance_miou"] > 0
