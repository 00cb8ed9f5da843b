"""Checkpoint I/O: safetensors weights + JSON metadata + a separate resume file.

A checkpoint is a directory:
    model.safetensors   unwrapped weights, our own key names (no `module.` / `_orig_mod.`)
    meta.json           config, epoch, step, metrics
    resume.pt           (only for the "last" checkpoint) optimizer state, epoch, step
Directories are written complete under `<name>.tmp` and then swapped in by rename, so a run
killed at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pqae.errors import BadInput, CheckpointMismatch, MissingFile


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(path: str | Path, state: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of a state dict (tensors made contiguous and unshared)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp),
              metadata=metadata)
    _fsync(tmp)
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise MissingFile(f"checkpoint {path} does not exist")
    return load_file(str(path))


def listing(items: list[str], first: int = 4) -> str:
    """The first few items, then how many more: a readable line however long the list."""
    shown = "; ".join(items[:first])
    return shown + (f"; ... and {len(items) - first} more" if len(items) > first else "")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                ignore: tuple[str, ...] = (), hint: str = "") -> None:
    """load_state_dict that fails with a short list of the missing and unexpected keys and of
    the shape mismatches (the first few of each, then a count), plus `hint` when shapes differ.
    Keys starting with a prefix in `ignore` are allowed to be missing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model:"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es), checkpoint vs model: {listing(shapes)}")
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): {listing(unexpected)}")
        if shapes and hint:
            lines.append(f"  {hint}")
        raise CheckpointMismatch("\n".join(lines))
    model.load_state_dict(state, strict=not ignore)


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict,
                    resume: dict | None = None) -> Path:
    """Write model.safetensors + meta.json (+ resume.pt) into `directory`, atomically.
    Non-finite weights raise FloatingPointError instead: the previous checkpoint stays."""
    final = Path(directory)
    state = unwrap(model).state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged model never replaces a good checkpoint
        raise FloatingPointError(
            f"refusing to write {final}: non-finite weights in {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}. The last good checkpoint is {find_checkpoint(final)}")
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(tmp / "model.safetensors", state,
                 {"format": "pqae", "step": str(meta.get("step", "")),
                  "config": json.dumps(meta.get("config", {}), default=str)})
    if resume is not None:
        torch.save(resume, tmp / "resume.pt")
        _fsync(tmp / "resume.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    _fsync(tmp / "meta.json")
    # Swap: the old checkpoint stays readable (as <name>.old) until the new one is in place.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at `directory`, or its `.old` twin if a run was killed during the
    swap; None if neither exists."""
    final = Path(directory)
    for cand in (final, final.with_name(final.name + ".old")):
        if (cand / "meta.json").exists() and (cand / "model.safetensors").exists():
            return cand
    return None


def load_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def load_resume(directory: str | Path) -> dict:
    path = Path(directory) / "resume.pt"
    if not path.exists():
        raise MissingFile(f"{path} missing: {directory} is not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


# Keys of a pretraining checkpoint that no downstream task uses (§3.3): the decoder side.
PRETRAIN_ONLY = ("decoder.", "query_attn.", "head.")


def load_pretrained_encoder(encoder: nn.Module, path: str | Path,
                            drop: tuple[str, ...] = ()) -> list[str]:
    """Load the `encoder.*` weights of a pretraining checkpoint (ours, or a reference one
    converted by `data_prep.convert_checkpoint`) into a PointEncoder, strictly.

    Only the pretraining-only keys (PRETRAIN_ONLY) and the full key names in `drop` (e.g. the
    class token, for an encoder without one) are dropped; they are returned so the caller can
    print them. Any other key that does not fit the encoder is an error naming it.
    """
    state = load_weights(path)
    dropped = sorted(k for k in state if k.startswith(PRETRAIN_ONLY) or k in drop)
    other = [k for k in state if not k.startswith(("encoder.",) + PRETRAIN_ONLY)]
    if other:
        raise CheckpointMismatch(
            f"{path} is not a pretraining checkpoint: {len(other)} key(s) outside the encoder "
            f"and the pretraining decoder: {listing(other)}. A fine-tuned model is evaluated "
            f"with --eval-ckpt, not loaded with --pretrained")
    enc = {k[len("encoder."):]: v for k, v in state.items()
           if k.startswith("encoder.") and k not in drop}
    load_strict(encoder, enc, source=f"the encoder of {path}",
                hint="the encoder's shape (--dim, --depth, --embed-hidden) differs from the "
                     "checkpoint's; leave those flags out to take them from the checkpoint")
    return dropped


def stop_if_diverged(losses: float | list[float], step: int, epoch: int,
                     out_dir: str | Path) -> None:
    """Training that goes NaN/inf stops here, naming the last good checkpoint: checkpoints are
    only written after this check has passed, so `ckpt-last` holds finite weights."""
    values = losses if isinstance(losses, list) else [losses]
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(
            f"loss is {values[0]} at step {step} (epoch {epoch}); stopping. The last good "
            f"checkpoint is {find_checkpoint(Path(out_dir) / 'ckpt-last')}")


# ---------------------------------------------------------------------------------------------
# What a checkpoint says about the model it holds

ENCODER_FIELDS = ("dim", "depth", "heads", "embed_hidden")
"""The config fields that fix the shape of a PointEncoder, named alike in every script."""


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def checkpoint_config(path: str | Path) -> dict | None:
    """The config a checkpoint of ours was written with (its meta.json, else the copy in the
    safetensors header), or None (a converted reference checkpoint has none)."""
    path = Path(path)
    if path.suffix == ".pth":  # a reference checkpoint: weights only
        return None
    meta = path / "meta.json"
    if path.is_dir() and meta.is_file():
        return json.loads(meta.read_text()).get("config")
    file = weights_file(path)
    if not file.is_file():
        raise MissingFile(f"checkpoint {path} does not exist")
    with safe_open(str(file), "pt") as f:
        header = f.metadata() or {}
    return json.loads(header["config"]) if "config" in header else None


def encoder_shape(path: str | Path) -> dict:
    """dim, depth, heads, embed_hidden of the encoder in a checkpoint (pretraining or
    fine-tuned). From the config it was written with when there is one; otherwise dim, depth
    and embed_hidden are read off the weights' shapes and heads is None (not in the weights)."""
    config = checkpoint_config(path)
    if config is not None and all(k in config for k in ENCODER_FIELDS):
        return {k: config[k] for k in ENCODER_FIELDS}
    with safe_open(str(weights_file(path)), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    try:
        blocks = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.blocks.")}
        return {"dim": shapes["encoder.norm.weight"][0], "depth": len(blocks),
                "heads": None, "embed_hidden": shapes["encoder.patch_embed.fc1.weight"][0]}
    except KeyError:
        raise CheckpointMismatch(f"{path} holds no point encoder (no encoder.norm.weight / "
                                 f"encoder.patch_embed.fc1.weight)") from None


def claim_out_dir(out_dir: str | Path, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """A run never destroys another one: a directory that already holds a run (config.json, a
    checkpoint or results) is refused unless --resume continues it or --overwrite deletes it
    first. Call on every rank before anything is written; rank 0 alone deletes."""
    out_dir = Path(out_dir)
    found = [n for n in ("config.json", "results.json", "ckpt-last", "ckpt-last.old")
             if (out_dir / n).exists()]
    if resume or not found:
        return
    if not overwrite:
        raise BadInput(
            f"{out_dir} already holds a run ({', '.join(found)}). Continue it with --resume, or "
            f"start a new one with --out-dir NEW_DIR, or delete it with --overwrite")
    resolved = out_dir.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
        raise BadInput(f"--overwrite would delete {resolved}: give a run directory as --out-dir")
    if rank == 0:
        shutil.rmtree(out_dir)
