"""Is pretraining stuck at the constant solution? Two numbers, computed at every log line.

A decoder that has collapsed predicts the same patch at every position: the spread of its
predictions across patches falls to ~0 while the targets' stays, and its loss equals the loss
of the best constant patch, the one patch that minimises the CD-L2 loss against all targets of
the batch. At small scale the method can sit there (seen: 618 airplanes, a small model, 1,140
steps, prediction spread 5e-5 against 0.16 for the targets); `pretrain.py` logs both numbers
and warns when a run is at that point past its warm-up.

* spread(patches): the standard deviation across patches of each point slot and coordinate,
  averaged: 0 for identical patches.
* best_constant_loss: the CD-L2 loss (mean d_pred + mean d_target, as the training loss) of
  one patch fitted to all targets of the batch by a few Adam steps, started from the mean
  prediction (a subsample of at most `max_patches` targets).
"""

from __future__ import annotations

import torch

import kernels.reference as ref

SPREAD_RATIO = 0.02
"""Below this prediction/target spread ratio, the predictions are (nearly) one patch."""
LOSS_RATIO = 0.97
"""At or above this share of the best constant patch's loss, the model does no better than it."""


def spread(patches: torch.Tensor) -> torch.Tensor:
    """(P, M, 3) -> scalar: the std over patches of each slot and coordinate, averaged."""
    return patches.float().std(dim=0).mean()


def chamfer_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CD-L2 as the training loss: pred (P, n, 3) or (n, 3) for a constant, target (P, m, 3)."""
    if pred.ndim == 2:
        pred = pred.expand(target.shape[0], -1, -1)
    d_pred, d_target = ref.chamfer_l2(pred, target.float())
    return d_pred.mean() + d_target.mean()


def subsample(pred: torch.Tensor, target: torch.Tensor, max_patches: int = 1024):
    """At most `max_patches` evenly spaced (pred, target) patch pairs."""
    if target.shape[0] <= max_patches:
        return pred, target
    pick = torch.linspace(0, target.shape[0] - 1, max_patches, device=target.device).long()
    return pred[pick], target[pick]


def best_constant_loss(pred: torch.Tensor, target: torch.Tensor, steps: int = 25,
                       max_patches: int = 1024, lr: float = 0.01) -> torch.Tensor:
    """The loss of the best constant patch on (a subsample of) these targets, and never more
    than that of the mean prediction it starts from. pred, target (P, M, 3)."""
    pred, target = subsample(pred.detach().float(), target.detach().float(), max_patches)
    with torch.enable_grad():
        const = pred.mean(dim=0).clone().requires_grad_(True)  # (M, 3)
        opt = torch.optim.Adam([const], lr=lr)
        best = chamfer_loss(const.detach(), target)
        for _ in range(steps):
            loss = chamfer_loss(const, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            best = torch.minimum(best, loss.detach())
    return torch.minimum(best, chamfer_loss(const.detach(), target))


@torch.no_grad()
def stats(out: dict) -> dict[str, float]:
    """From a training step's outputs (`return_outputs=True`): per view-averaged prediction /
    target spread ratio, the model's loss and the best constant patch's loss on the same
    patches (the subsample used for the constant)."""
    ratios, model, const = [], [], []
    for v in ("1", "2"):
        pred, target = out[f"pred{v}"], out[f"neighborhood{v}"]
        pred, target = pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:])
        ratios.append(spread(pred) / spread(target).clamp_min(1e-12))
        pred, target = subsample(pred, target)
        model.append(chamfer_loss(pred.float(), target))
        const.append(best_constant_loss(pred, target))
    values = torch.stack([sum(ratios) / 2, sum(model), sum(const)]).tolist()  # one host read
    return {"spread_ratio": values[0], "loss_sample": values[1], "constant_loss": values[2]}


def collapsed(s: dict[str, float]) -> bool:
    """The predictions are one patch, and no better than the best one."""
    return s["spread_ratio"] < SPREAD_RATIO and s["loss_sample"] >= LOSS_RATIO * s["constant_loss"]


def warning(s: dict[str, float]) -> str:
    """What the log says when `collapsed(s)`."""
    return (f"warning: the decoder predicts one patch everywhere (its spread across patches is "
            f"{s['spread_ratio']:.2g} of the targets') and its loss {s['loss_sample']:.4f} is no "
            f"better than the best constant patch's {s['constant_loss']:.4f}: the run sits at the "
            f"constant solution (see pqae/collapse.py)")
