"""AdamW parameter groups and the reference learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, head_lr_scale: float | None = None,
                 head_key: str = "cls") -> list[dict]:
    """The reference's three groups, in order, frozen parameters skipped:

    1. head group (only when head_lr_scale is given, i.e. fine-tuning): every parameter whose
       name contains `head_key`, at lr x head_lr_scale, WITH weight decay (biases and norms too);
    2. no-decay group: 1-D parameters, names ending in ".bias", names containing "token";
    3. decay group: everything else.
    Each group carries "lr_scale" so the schedule can set lr = scale * f(epoch).
    """
    head, no_decay, decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if head_lr_scale is not None and head_key in name:
            head.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if head_lr_scale is not None:
        groups.append({"params": head, "weight_decay": weight_decay, "lr_scale": head_lr_scale})
    groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
    groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def cosine_lr(t: int, base_lr: float, epochs: int, warmup_epochs: int,
              min_lr: float = 1e-6, warmup_lr: float = 1e-6) -> float:
    """timm 0.4.5 CosineLRScheduler at integer epoch t (t_in_epochs, no prefix, 1 cycle).

    The cosine runs over the absolute t (warmup not subtracted); after `epochs` it is min_lr.
    """
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def lr_for_epoch(epoch: int, base_lr: float, epochs: int, warmup_epochs: int,
                 min_lr: float = 1e-6, warmup_lr: float = 1e-6) -> float:
    """The lr USED during `epoch`: the reference steps the scheduler at the end of each epoch
    with that epoch's index, so epoch e trains at f(e - 1), and epoch 0 at the warmup start
    (or at base_lr when there is no warmup: timm then leaves the optimizer's lr alone)."""
    if epoch == 0:
        return warmup_lr if warmup_epochs > 0 else base_lr
    return cosine_lr(epoch - 1, base_lr, epochs, warmup_epochs, min_lr, warmup_lr)


def set_epoch_lr(optimizer, epoch: int, base_lr: float, epochs: int, warmup_epochs: int) -> float:
    """Set every group's lr for `epoch`. Each group runs its own schedule from base_lr x scale,
    with the same absolute warmup start and floor (1e-6), as timm does per group. Returns the
    lr of the 1x groups (the real lr; the reference logs group 0, the empty 10x group)."""
    for g in optimizer.param_groups:
        lr = lr_for_epoch(epoch, base_lr * g.get("lr_scale", 1.0), epochs, warmup_epochs)
        if isinstance(g["lr"], torch.Tensor):  # a captured step's lr (pqae.graphs): in place
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr
    return lr_for_epoch(epoch, base_lr, epochs, warmup_epochs)
