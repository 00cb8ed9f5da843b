"""Convert a reference Point-PQAE checkpoint (.pth) into our safetensors layout.

    python -m data_prep.convert_checkpoint ckpt-epoch-300.pth pqae-pretrain.safetensors

The reference saves a dict whose `base_model` holds the state dict, with keys prefixed
`module.` when trained under DataParallel (§2.12). The file is read with
torch.load(weights_only=True): no code in it is executed. The converted weights are checked
by loading them strictly into `PointPQAE()`. The reference's `decoder_pos_embed` is built but
never used; it is dropped and reported. Any other key we do not know is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from pqae import PointPQAE
from pqae.checkpoint import load_strict, save_weights

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
        raise KeyError(f"unknown keys in the reference checkpoint ({len(unknown)}): {unknown}")
    return out, dropped_keys


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a reference checkpoint (`base_model`, or `model`, or the dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("base_model", "model"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict with `base_model` (a state dict of tensors), "
                         f"found {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, dict) else ''}")
    return obj


@dataclass(frozen=True)
class Args:
    src: tyro.conf.Positional[str]
    """reference pretraining checkpoint (.pth), e.g. ckpt-epoch-300.pth"""
    dst: tyro.conf.Positional[str]
    """output .safetensors"""


def main(args: Args) -> dict[str, torch.Tensor]:
    state, dropped = convert_state(read_reference(args.src))
    load_strict(PointPQAE(), state, source=f"converted {args.src}")  # strict check
    save_weights(args.dst, state, {"format": "pqae", "source": Path(args.src).name})
    print(f"wrote {args.dst}: {len(state)} tensors")
    if dropped:
        print(f"dropped {len(dropped)} unused reference keys: {dropped}")
    return state


if __name__ == "__main__":
    main(tyro.cli(Args))
