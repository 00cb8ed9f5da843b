"""Convert a reference Point-PQAE checkpoint (.pth) into our safetensors layout, once.

    python -m data_prep.convert_checkpoint ckpt-epoch-300.pth pqae-pretrain.safetensors
    python -m data_prep.convert_checkpoint scan_hardest.pth scan-hardest.safetensors  # fine-tuned
    python -m data_prep.convert_checkpoint best_model.pth partseg.safetensors          # segmentation

The four layouts (pretraining, fine-tuned classification, part and semantic segmentation) and
their key mapping are in `pqae.formats`, which the scripts also use to read a reference `.pth`
on the fly (`--eval-ckpt best_model.pth`). The layout is detected from the keys, or forced with
--layout. The converted weights are checked by loading them strictly into the model they
belong to, shaped from the weights themselves (`PointPQAE()` for pretraining; the classifier's
head type and number of classes, the segmenter's widths, read off the tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from pqae import PointClassifier, PointPQAE
from pqae.checkpoint import load_strict, save_weights
from pqae.errors import UserError
from pqae.formats import convert_any, read_reference


def segmenter_for(state: dict[str, torch.Tensor], layout: str):
    """A PointSegmenter shaped like a converted segmentation state (classes, width, depth,
    propagation and head widths read from the weights; the reference's blocks 4, 8, 12 scaled
    to the depth), for the strict check and for evaluation."""
    from pqae.segmentation import PointSegmenter, feature_blocks_for
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    dim = state["encoder.norm.weight"].shape[0]
    fp = tuple(state[f"propagation.mlp_convs.{i}.weight"].shape[0]
               for i in range(len({k.split(".")[2] for k in state if k.startswith("propagation.mlp_convs.")})))
    return PointSegmenter(state["convs3.weight"].shape[0],
                          num_categories=state["label_conv.0.weight"].shape[1] if layout == "partseg" else 0,
                          dim=dim, depth=depth, heads=max(1, dim // 64),
                          embed_hidden=state["encoder.patch_embed.fc1.weight"].shape[0],
                          feature_blocks=feature_blocks_for(depth), fp_dims=fp,
                          head_dims=(state["convs1.weight"].shape[0], state["convs2.weight"].shape[0]))


def classifier_for(state: dict[str, torch.Tensor]) -> PointClassifier:
    """A PointClassifier shaped like a converted fine-tuned state (head type, classes, width,
    depth read from the weights), for the strict check."""
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    dim = state["encoder.cls_token"].shape[-1]
    last = max(int(k.split(".")[1]) for k in state if k.startswith("cls_head."))
    return PointClassifier(num_classes=state[f"cls_head.{last}.weight"].shape[0],
                           head="linear" if last == 0 else "full", dim=dim, depth=depth,
                           heads=max(1, dim // 64),
                           embed_hidden=state["encoder.patch_embed.fc1.weight"].shape[0])


@dataclass(frozen=True)
class Args:
    src: tyro.conf.Positional[str]
    """reference pretraining checkpoint (.pth), e.g. ckpt-epoch-300.pth"""
    dst: tyro.conf.Positional[str]
    """output .safetensors"""
    layout: Literal["auto", "pretrain", "finetune-cls", "partseg", "semseg"] = "auto"
    """reference layout; auto: detected from the key names."""


def main(args: Args) -> dict[str, torch.Tensor]:
    state, dropped, layout = convert_any(read_reference(args.src), args.layout)
    model = PointPQAE() if layout == "pretrain" else classifier_for(state) \
        if layout == "finetune-cls" else segmenter_for(state, layout)
    load_strict(model, state, source=f"converted {args.src}")  # strict check
    save_weights(args.dst, state, {"format": "pqae", "layout": layout,
                                   "source": Path(args.src).name})
    print(f"wrote {args.dst} ({layout}): {len(state)} tensors")
    if dropped:
        print(f"dropped {len(dropped)} unused reference keys: {dropped}")
    return state


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        raise SystemExit(2) from None
