"""Every checkpoint format the scripts read: ours, and the reference Point-PQAE's `.pth`,
whose keys are renamed to ours on the fly (`load_state`). `python -m data_prep.convert_checkpoint`
writes the converted weights to a file once.

Four reference layouts, detected from the keys (or named):
* pretraining (`PQAE_encoder.*`, `PQ_decoder.*`, ...) -> `PointPQAE` keys;
* fine-tuned classification (`PointTransformer` of Point-MAE / Point-PQAE: `cls_token`,
  `encoder.first_conv.*`, `blocks.blocks.*`, `cls_head_finetune.*`) -> `PointClassifier` keys;
* part segmentation (`best_model.pth` of `segmentation/main.py`: `model_state_dict` with
  `encoder.*`, `blocks.blocks.*`, `label_conv.*`, `propagation_0.*`, `convs1..3`, `bns1..2`)
  and semantic segmentation (the same without `label_conv`, new layers suffixed `_cls`) ->
  `PointSegmenter` keys.

The reference saves a dict whose `base_model` holds the state dict, with keys prefixed
`module.` when trained under DataParallel. The file is read with torch.load(weights_only=True):
no code in it is executed. The reference's `decoder_pos_embed` is built but never used; it is
dropped and reported. Any other key we do not know is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pqae.checkpoint import load_strict, load_weights, safetensors_problem
from pqae.errors import BadInput, CheckpointMismatch, MissingFile

# (reference prefix, our prefix), first match wins; applied after removing every "module.".
PRETRAIN_PREFIXES = [
    ("PQAE_encoder.encoder.first_conv.0.", "encoder.patch_embed.fc1."),
    ("PQAE_encoder.encoder.first_conv.1.", "encoder.patch_embed.bn1."),
    ("PQAE_encoder.encoder.first_conv.3.", "encoder.patch_embed.fc2."),
    ("PQAE_encoder.encoder.second_conv.0.", "encoder.patch_embed.fc3."),
    ("PQAE_encoder.encoder.second_conv.1.", "encoder.patch_embed.bn2."),
    ("PQAE_encoder.encoder.second_conv.3.", "encoder.patch_embed.fc4."),
    ("PQAE_encoder.pos_embed.0.", "encoder.pos_embed.fc1."),
    ("PQAE_encoder.pos_embed.2.", "encoder.pos_embed.fc2."),
    ("PQAE_encoder.blocks.blocks.", "encoder.blocks."),
    ("PQAE_encoder.norm.", "encoder.norm."),
    ("PQAE_encoder.cls_token", "encoder.cls_token"),
    ("PQAE_encoder.cls_pos", "encoder.cls_pos"),
    ("PQ_decoder.", "decoder."),
    ("PQattn_contrast.", "query_attn."),
    ("PQ_linear.", "head."),
]
PRETRAIN_DROPPED = ("decoder_pos_embed.",)  # built but never used by the reference

# The fine-tuned classifier (`PointTransformer`) has no `PQAE_encoder.` level. Its head
# `cls_head_finetune` is Sequential(Linear, BN, ReLU, Dropout, Linear, BN, ReLU, Dropout,
# Linear) (indices 0, 1, 4, 5, 8 hold weights) or a single Linear; our `cls_head` is a
# Sequential with the same indices, so the head keeps its numbering.
FINETUNE_CLS_PREFIXES = [
    ("encoder.first_conv.0.", "encoder.patch_embed.fc1."),
    ("encoder.first_conv.1.", "encoder.patch_embed.bn1."),
    ("encoder.first_conv.3.", "encoder.patch_embed.fc2."),
    ("encoder.second_conv.0.", "encoder.patch_embed.fc3."),
    ("encoder.second_conv.1.", "encoder.patch_embed.bn2."),
    ("encoder.second_conv.3.", "encoder.patch_embed.fc4."),
    ("pos_embed.0.", "encoder.pos_embed.fc1."),
    ("pos_embed.2.", "encoder.pos_embed.fc2."),
    ("blocks.blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("cls_token", "encoder.cls_token"),
    ("cls_pos", "encoder.cls_pos"),
    ("cls_head_finetune.weight", "cls_head.0.weight"),  # a bare Linear head
    ("cls_head_finetune.bias", "cls_head.0.bias"),
    ("cls_head_finetune.", "cls_head."),
]
# The segmentation models (`segmentation/models/pt.py`, `semantic_segmentation/models/pt.py`)
# have the classifier's encoder names (no class token) and their own heads, saved as
# `best_model.pth` {'model_state_dict': ...}. The semantic one suffixes its new layers with
# `_cls` (`propagation_0_cls`, `convs1_cls`, `bns1_cls`, ...); its own test loader accepts
# either spelling, and so does `seg_name` here. Their Conv1d heads stay Conv1d in ours.
SEG_PREFIXES = [p for p in FINETUNE_CLS_PREFIXES if not p[0].startswith("cls")] + [
    ("label_conv.", "label_conv."),
    ("propagation_0.", "propagation."),
    *[(f"{m}.", f"{m}.") for m in ("convs1", "convs2", "convs3", "bns1", "bns2")],
]
LAYOUTS = ("pretrain", "finetune-cls", "partseg", "semseg")


def seg_name(key: str) -> str:
    """`propagation_0_cls.x` -> `propagation_0.x`: the `_cls` suffix of a module name dropped."""
    return re.sub(r"^((?:module\.)*)(\w+?)_cls\.", r"\1\2.", key)


def convert_state(state: dict[str, torch.Tensor], prefixes=PRETRAIN_PREFIXES,
                  dropped=PRETRAIN_DROPPED) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename reference keys to ours; 1x1 Conv1d weights (out, in, 1) become Linear (out, in).
    Returns (converted state, dropped reference keys). Unknown keys raise KeyError."""
    out, dropped_keys, unknown = {}, [], []
    for key, value in state.items():
        name = key.replace("module.", "")
        if name.startswith(dropped):
            dropped_keys.append(key)
            continue
        for ref, ours in prefixes:
            if name.startswith(ref):
                new = ours + name[len(ref):]
                break
        else:
            unknown.append(key)
            continue
        if value.ndim == 3 and value.shape[-1] == 1 and re.search(r"\.fc\d\.weight$", new):
            value = value[..., 0]  # Conv1d kernel size 1 -> Linear
        out[new] = value
    if unknown:
        raise CheckpointMismatch(f"unknown keys in the reference checkpoint ({len(unknown)}): {unknown}")
    return out, dropped_keys


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """"pretrain", "finetune-cls", "partseg" or "semseg" from the key names."""
    names = [seg_name(k).replace("module.", "") for k in state]
    if any(n.startswith("PQAE_encoder.") for n in names):
        return "pretrain"
    if any(n.startswith("cls_head_finetune") for n in names):
        return "finetune-cls"
    if any(n.startswith("propagation_0.") for n in names):
        return "partseg" if any(n.startswith("label_conv.") for n in names) else "semseg"
    raise BadInput(f"cannot tell the checkpoint layout: no `PQAE_encoder.*` (pretraining), "
                   f"`cls_head_finetune.*` (fine-tuned classifier) or `propagation_0.*` "
                   f"(segmentation) key; first keys {names[:8]}")


def convert_any(state: dict[str, torch.Tensor], layout: str = "auto"
                ) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Convert a reference state dict of either layout: (our state, dropped keys, layout)."""
    layout = detect_layout(state) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if layout == "pretrain":
        return (*convert_state(state), layout)
    if layout in ("partseg", "semseg"):
        if layout == "semseg" and any(seg_name(k).replace("module.", "").startswith("label_conv.")
                                      for k in state):
            raise BadInput("--layout semseg, but the checkpoint has a category embedding "
                           "(label_conv): it is a part segmentation model (--layout partseg)")
        return (*convert_state({seg_name(k): v for k, v in state.items()}, SEG_PREFIXES,
                               dropped=()), layout)
    return (*convert_state(state, FINETUNE_CLS_PREFIXES, dropped=()), layout)


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a reference checkpoint (`base_model`, or `model`, or the dict)."""
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:9] == b"{" and safetensors_problem(path) is None:
        raise BadInput(f"{path} is a safetensors file, not a reference .pth: it needs no "
                       f"conversion (give it to the scripts directly)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message names no file; weights_only refuses any code
        raise BadInput(f"{path} is not a readable reference checkpoint (.pth saved by torch.save"
                       f" with tensors only): {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for key in ("base_model", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"{path}: expected a dict with `base_model` (a state dict of tensors), "
                       f"found {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, dict) else ''}")
    return obj


def load_state(path: str | Path, layout: str) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: ours (a checkpoint directory or a .safetensors file), or a
    reference `.pth` of `layout`, converted on the fly."""
    if str(path).endswith(".pth"):
        return convert_any(read_reference(path), layout)[0]
    return load_weights(path)


def load_model(model: torch.nn.Module, path: str | Path, layout: str) -> None:
    """Strict load of a whole saved model (--eval-ckpt) of any format (`load_state`)."""
    load_strict(model, load_state(path, layout), source=str(path),
                hint="the model's fields differ from the checkpoint's; leave them out")
