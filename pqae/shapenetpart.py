"""ShapeNetPart for part segmentation: the resident data set and the metrics.

Data: `python -m data_prep.shapenetpart` writes one HDF5 file with groups "train" (the
reference's `trainval` = train + val lists) and "test". Shapes have different point counts,
so each group stores them concatenated, with offsets (see `FORMAT`). `load_split` reads a
group into a `PartSplit` of tensors, each shape unit-sphere normalised over all its points as
the reference does per sample; `PartSplit.sample` then draws the 2048 points per shape WITH
replacement on whatever device the split lives.

Metrics: `restricted_argmax` (prediction limited to the shape's category's parts),
`shape_ious` (per-shape mean part IoU, a part absent from both prediction and ground truth
counts 1.0), `summarize` (accuracy, class mIoU, instance mIoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pqae.errors import BadInput, MissingFile, reading

from pqae.data import MAX_COORD, check_finite

# Official category order (synsetoffset2category.txt, alphabetical) and parts per category.
CATEGORIES = ("Airplane", "Bag", "Cap", "Car", "Chair", "Earphone", "Guitar", "Knife", "Lamp",
              "Laptop", "Motorbike", "Mug", "Pistol", "Rocket", "Skateboard", "Table")
NUM_PARTS = (4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3)
PART_START = tuple(int(x) for x in np.cumsum((0,) + NUM_PARTS[:-1]))  # Airplane 0, Bag 4, ...
NUM_CLASSES = sum(NUM_PARTS)  # 50
# part label -> category index
PART_TO_CATEGORY = tuple(c for c, n in enumerate(NUM_PARTS) for _ in range(n))

FORMAT_VERSION = 1
FORMAT = (
    "groups 'train' and 'test', each with datasets 'points' (P, 3) float32 (all shapes' xyz, "
    "concatenated, as in the source files), 'labels' (P,) uint8 (part labels 0-49), "
    "'offsets' (S + 1,) int64 (shape s is rows offsets[s]:offsets[s+1]), 'category' (S,) "
    "int64 (index into CATEGORIES) and 'names' (S,) bytes ('<synset>/<model id>')"
)


def part_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """(16, 50) bool: which parts belong to each category."""
    mask = torch.zeros(len(CATEGORIES), NUM_CLASSES, dtype=torch.bool)
    for c, (start, n) in enumerate(zip(PART_START, NUM_PARTS)):
        mask[c, start:start + n] = True
    return mask.to(device)


# --------------------------------------------------------------------------------------------
# The resident split


@dataclass
class PartSplit:
    points: torch.Tensor  # (P, 3) float32, each shape on the unit sphere
    labels: torch.Tensor  # (P,) int64 part labels
    offsets: torch.Tensor  # (S + 1,) int64
    category: torch.Tensor  # (S,) int64
    names: list[str]

    def __len__(self) -> int:
        return self.category.shape[0]

    def to(self, device: torch.device | str) -> PartSplit:
        return PartSplit(self.points.to(device), self.labels.to(device),
                         self.offsets.to(device), self.category.to(device), self.names)

    def sample(self, idx: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points uniformly WITH replacement from the shapes `idx` (B,), as the reference.

        u (B, n) uniform [0, 1) draws choose the points (the caller owns the randomness).
        -> points (B, n, 3), labels (B, n).
        """
        idx = idx.to(self.offsets.device)
        start = self.offsets[idx]  # (B,)
        count = self.offsets[idx + 1] - start
        local = (u.to(self.points.device) * count[:, None]).long()
        rows = start[:, None] + torch.minimum(local, count[:, None] - 1)  # (B, n)
        return self.points[rows], self.labels[rows]


def augment(points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Train augmentation: per-cloud isotropic scale U(0.8, 1.25), then per-cloud
    translation U(-0.1, 0.1) per axis. points (B, n, 3) -> new tensor."""
    B = points.shape[0]
    dev = points.device
    scale = 0.8 + 0.45 * torch.rand(B, 1, 1, device=dev, generator=generator)
    shift = -0.1 + 0.2 * torch.rand(B, 1, 3, device=dev, generator=generator)
    return points * scale + shift


def _unit_sphere_segments(points: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per shape: subtract the centroid, divide by the max point norm (over ALL its points)."""
    counts = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)  # (P,) shape id
    centroid = torch.zeros(counts.shape[0], 3, dtype=torch.float64)
    centroid.index_add_(0, seg, points.double())
    centroid = (centroid / counts[:, None]).float()
    points = points - centroid[seg]
    scale = torch.zeros(counts.shape[0]).scatter_reduce(0, seg, points.norm(dim=1), "amax")
    return points / scale.clamp_min(1e-12)[seg, None]


# The two-part categories (Bag, Cap, Knife, Laptop, Mug): the procedural set's categories.
_TWO_PART = tuple(c for c, n in enumerate(NUM_PARTS) if n == 2)


def procedural_split(num_shapes: int, num_points: int = 2048, seed: int = 0) -> PartSplit:
    """Built-in part-segmentation data for smoke runs, no files: each shape is two primitive
    surfaces side by side. Its category is one of the five two-part ShapeNetPart categories,
    which fixes the pair of primitive kinds; the first primitive is the category's first part,
    the other its second. Unit-sphere normalised, num_points points per shape."""
    from pqae.data import _primitives, _uniform  # the procedural shape generator's surfaces

    g = torch.Generator().manual_seed(seed)
    c = torch.arange(num_shapes) % len(_TWO_PART)  # (S,) index into _TWO_PART
    half = num_points // 2
    first = _primitives(c, half, g)  # kinds 0..4: ellipsoid, box, cylinder, cone, torus
    second = _primitives((c + 2) % len(_TWO_PART), num_points - half, g) * 0.6
    direction = torch.nn.functional.normalize(torch.randn(num_shapes, 1, 3, generator=g), dim=-1)
    second = second + direction * _uniform(g, (num_shapes, 1, 1), 1.2, 1.6)  # beside the first
    points = torch.cat([first, second], dim=1).reshape(-1, 3)  # (S * N, 3)
    category = torch.tensor(_TWO_PART)[c]
    start = torch.tensor(PART_START)[category]  # (S,)
    labels = (start[:, None] + (torch.arange(num_points) >= half)).reshape(-1)  # (S * N,)
    offsets = torch.arange(num_shapes + 1) * num_points
    return PartSplit(_unit_sphere_segments(points, offsets), labels, offsets, category,
                     [f"procedural_{i}" for i in range(num_shapes)])


def load_split(path: str | Path, split: str) -> PartSplit:
    """Read group `split` ("train" = trainval, or "test") of the converter's HDF5 file."""
    import h5py

    if split not in ("train", "test"):
        raise BadInput(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingFile(
            f"ShapeNetPart file not found: {path}. Create it from the official release with "
            f"`python -m data_prep.shapenetpart --root "
            f"data/shapenetcore_partanno_segmentation_benchmark_v0_normal --out {path}`, or try "
            f"the built-in data first: `python partseg.py --preset tiny`")
    with reading(path, f"an HDF5 file with {FORMAT}"), h5py.File(path, "r") as f:
        if split not in f:
            raise BadInput(f"{path}: expected {FORMAT}; found no group '{split}' "
                           f"(top-level keys: {sorted(f.keys())})")
        g = f[split]
        missing = [k for k in ("points", "labels", "offsets", "category", "names") if k not in g]
        if missing:
            raise BadInput(f"{path}: expected {FORMAT}; group '{split}' lacks {missing}")
        points, labels, offsets = g["points"][()], g["labels"][()], g["offsets"][()]
        category, names = g["category"][()], [n.decode() for n in g["names"][()]]
    S = category.shape[0]
    ok = (points.ndim == 2 and points.shape[1] == 3 and points.dtype == np.float32
          and labels.shape == (points.shape[0],) and offsets.shape == (S + 1,)
          and len(names) == S and S > 0 and offsets[0] == 0 and offsets[-1] == points.shape[0]
          and bool(np.all(np.diff(offsets) > 0)))
    if not ok:
        raise BadInput(
            f"{path}: expected {FORMAT}; found in '{split}' points {points.shape} {points.dtype}, "
            f"labels {labels.shape}, offsets {offsets.shape} (first {offsets[:1]}, last "
            f"{offsets[-1:]}), category {category.shape}, {len(names)} names")
    if category.min() < 0 or category.max() >= len(CATEGORIES):
        raise BadInput(f"{path}: '{split}/category' has values outside 0..15")
    seg = np.repeat(np.arange(S), np.diff(offsets))
    bad = ~part_mask().numpy()[category[seg], np.clip(labels, 0, NUM_CLASSES - 1)] \
        | (labels < 0) | (labels >= NUM_CLASSES)  # -1 would index part 49
    if bad.any():
        s = int(seg[np.argmax(bad)])
        raise BadInput(f"{path}: shape {names[s]} ({CATEGORIES[category[s]]}) has part labels "
                       f"outside its parts {PART_START[category[s]]}.."
                       f"{PART_START[category[s]] + NUM_PARTS[category[s]] - 1}")
    pts, offs = torch.from_numpy(points), torch.from_numpy(offsets.astype(np.int64))
    check_finite(pts[None], f"{path} (split {split!r})")
    starts = offsets[:-1].astype(np.int64)
    flat = (np.maximum.reduceat(points, starts) == np.minimum.reduceat(points, starts)).all(1)
    big = np.maximum.reduceat(np.abs(points).max(1), starts) > MAX_COORD
    for mask, what in ((big, f"coordinates beyond +-{MAX_COORD:g}"),
                       (flat & ~big, "zero extent (every point the same)")):
        if mask.any():
            bad = np.flatnonzero(mask)
            raise BadInput(f"{path}: '{split}' shape(s) that cannot be normalised: {what} in "
                           + ", ".join(f"{names[s]} (index {s})" for s in bad[:5])
                           + (" ..." if len(bad) > 5 else ""))
    return PartSplit(_unit_sphere_segments(pts, offs), torch.from_numpy(labels.astype(np.int64)),
                     offs, torch.from_numpy(category.astype(np.int64)), names)


# --------------------------------------------------------------------------------------------
# Metrics


def restricted_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted part per point, limited to the shape's category, which (as in the reference)
    is read from the ground-truth label of its first point. logits (B, n, 50), labels (B, n)
    -> (B, n) part labels."""
    cat = torch.tensor(PART_TO_CATEGORY, device=labels.device)[labels[:, 0]]  # (B,)
    allowed = part_mask(logits.device)[cat]  # (B, 50)
    return logits.masked_fill(~allowed[:, None], float("-inf")).argmax(-1)


def shape_ious(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean part IoU of each shape over its category's parts; a part absent from both the
    prediction and the ground truth counts as 1.0. pred, labels (B, n) -> (B,) float64."""
    cat = torch.tensor(PART_TO_CATEGORY, device=labels.device)[labels[:, 0]]
    p = torch.nn.functional.one_hot(pred, NUM_CLASSES).bool()  # (B, n, 50)
    t = torch.nn.functional.one_hot(labels, NUM_CLASSES).bool()
    inter = (p & t).sum(1).double()  # (B, 50)
    union = (p | t).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    mask = part_mask(labels.device)[cat].double()  # (B, 50)
    return (iou * mask).sum(1) / mask.sum(1)


def summarize(ious: torch.Tensor, category: torch.Tensor, correct: int, total: int) -> dict:
    """Accuracy, class mIoU and instance mIoU from per-shape IoUs (S,) and categories (S,).

    Instance mIoU is the mean over shapes; class mIoU the mean over categories of the mean
    shape IoU in each. Only categories present are averaged: the reference averages all 16
    and so returns NaN when one is missing (never on the full test split).
    """
    ious, category = ious.double().cpu(), category.cpu()
    per_cat = {CATEGORIES[c]: float(ious[category == c].mean()) for c in category.unique().tolist()}
    return {"acc": correct / total, "class_miou": float(np.mean(list(per_cat.values()))),
            "instance_miou": float(ious.mean()), "category_miou": per_cat}
