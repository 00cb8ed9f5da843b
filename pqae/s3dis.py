"""S3DIS semantic segmentation data and metrics: rooms, 1 m blocks, whole-room windows.

Design, as for the other data sets: all rooms of a split are held WHOLE on the device, as one
concatenated (P, 3) float32 xyz tensor and one (P,) label tensor with room offsets, and every
block is cut out there (a mask over its room's points). No DataLoader, no worker processes.

* `load_rooms`          rooms from the HDF5 of `python -m data_prep.s3dis` (or a directory of
                         reference-style `Area_k_<room>.npy` files), filtered by area;
                         `make_rooms` builds the same `Rooms` from in-memory arrays.
* `procedural_rooms`    small generated rooms with the 13 classes; needs no files (tiny runs,
                        tests).
* `class_weights`       w_c = (max f / f_c)^(1/3) from the label histogram.
* `epoch_rooms`         which room each training sample of an epoch comes from.
* `sample_block`        one random 1 m x 1 m block of `num_points` points.
* `window_chunks`       the whole-room sliding-window cover used for voting.
* `confusion` / `scores`  confusion counts and mIoU, mAcc, OA, per-class IoU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pqae.data import MAX_COORD
from pqae.errors import BadInput, MissingFile, reading

CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair",
           "sofa", "bookcase", "board", "clutter")
NUM_CLASSES = len(CLASSES)
CLUTTER = CLASSES.index("clutter")
S3DIS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Rooms:
    """Rooms of one split, concatenated: room r is rows offsets[r]:offsets[r + 1]."""
    names: tuple[str, ...]
    xyz: torch.Tensor  # (P, 3) float32, shifted so that each room's minimum is at the origin
    labels: torch.Tensor  # (P,) int64 in 0..12
    offsets: tuple[int, ...]  # (R + 1,)

    def __len__(self) -> int:
        return len(self.names)

    def room(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[r], self.offsets[r + 1]
        return self.xyz[a:b], self.labels[a:b]

    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def to(self, device: torch.device) -> "Rooms":
        return Rooms(self.names, self.xyz.to(device), self.labels.to(device), self.offsets)


def area_of(name: str) -> int:
    """`Area_5_office_1` -> 5."""
    return int(name.split("_")[1])


def make_rooms(arrays: dict[str, np.ndarray], source: str) -> Rooms:
    """(N, >=7) arrays x y z r g b label per room -> Rooms (rgb dropped: the model sees only
    xyz). Validates shape, finiteness and label range, naming the room."""
    names = tuple(sorted(arrays))
    xyz, labels, offsets = [], [], [0]
    for name in names:
        a = arrays[name]
        if a.ndim != 2 or a.shape[1] < 7 or a.shape[0] == 0:
            raise BadInput(f"{source}: room {name} has shape {a.shape}, expected (N > 0, 7)")
        if not np.isfinite(a[:, :3]).all():
            raise BadInput(f"{source}: room {name} contains NaN or inf coordinates")
        if np.abs(a[:, :3]).max() > MAX_COORD:
            raise BadInput(f"{source}: room {name} has coordinates beyond +-{MAX_COORD:g} "
                           f"(the blocks' normalisation would lose them)")
        if (a[:, :3].max(0) == a[:, :3].min(0)).all():
            raise BadInput(f"{source}: room {name} has zero extent (every point the same)")
        lab = a[:, 6]
        if lab.min() < 0 or lab.max() >= NUM_CLASSES or (lab != np.round(lab)).any():
            raise BadInput(f"{source}: room {name} has labels outside 0..{NUM_CLASSES - 1}")
        xyz.append(torch.from_numpy(np.ascontiguousarray(a[:, :3], dtype=np.float32)))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
        offsets.append(offsets[-1] + a.shape[0])
    return Rooms(names, torch.cat(xyz), torch.cat(labels), tuple(offsets))


def load_rooms(path: str | Path, areas: tuple[int, ...]) -> Rooms:
    """The rooms of the given areas, sorted by name. `path` is the converter's HDF5 file (group
    `rooms`, one (N, 7) float32 array per room) or a directory of `Area_k_<room>.npy` files
    written by the reference's `collect_indoor3d_data.py` (same columns)."""
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"S3DIS data {path} does not exist. Create it with `python -m data_prep."
                          f"s3dis --root data/Stanford3dDataset_v1.2_Aligned_Version --out {path}`,"
                          f" or try the built-in data first: `python semseg.py --preset tiny`")
    arrays = {}
    if path.is_dir():
        for f in sorted(path.glob("Area_*.npy")):
            if area_of(f.stem) in areas:
                with reading(f, "an (N, 7) float32 .npy room (x y z r g b label)"):
                    arrays[f.stem] = np.load(f, allow_pickle=False)
    else:
        import h5py  # only this loader needs it
        with reading(path, "the HDF5 file of data_prep.s3dis (group `rooms`)"), \
                h5py.File(path, "r") as f:
            if "rooms" not in f:
                raise BadInput(f"{path}: no `rooms` group; not written by data_prep.s3dis")
            for name, ds in f["rooms"].items():
                if area_of(name) in areas:
                    arrays[name] = ds[()]
    if not arrays:
        raise BadInput(f"{path}: no rooms of area(s) {list(areas)}")
    return make_rooms(arrays, str(path))


def procedural_rooms(areas: tuple[int, ...], points_per_room: int = 12000,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """One generated box-shaped room per entry of `areas`, as (N, 7) float32 arrays
    x y z r g b label keyed by `Area_k_room_r`: floor, ceiling, three walls, a window and a
    door, a table, a chair and some clutter. Rooms measure 2.0-2.8 m x 1.6-2.2 m x 2.4 m, so
    that a 1 m block inside a room of 12,000 points holds about 1,500 of them."""
    rng = np.random.default_rng(seed)
    rooms = {}
    for r, area in enumerate(areas):
        sx, sy, sz = rng.uniform(2.0, 2.8), rng.uniform(1.6, 2.2), 2.4
        parts = []  # (points (n, 3), label)

        def box(lo, hi, label, n):
            parts.append((rng.uniform(lo, hi, size=(n, 3)), label))

        n = points_per_room // 10
        box((0, 0, 0), (sx, sy, 0), CLASSES.index("floor"), 3 * n)
        box((0, 0, sz), (sx, sy, sz), CLASSES.index("ceiling"), 3 * n)
        box((0, 0, 0), (0, sy, sz), CLASSES.index("wall"), n // 2)
        box((sx, 0, 0), (sx, sy, sz), CLASSES.index("wall"), n // 2)
        box((0, 0, 0), (sx, 0, sz), CLASSES.index("wall"), n // 2)
        box((0, sy, 0), (sx, sy, sz), CLASSES.index("window"), n // 4)
        box((0.1, sy, 0), (0.9, sy, 2.0), CLASSES.index("door"), n // 4)
        box((sx / 2 - 0.4, sy / 2 - 0.3, 0.7), (sx / 2 + 0.4, sy / 2 + 0.3, 0.75),
            CLASSES.index("table"), n // 2)
        box((0.3, 0.3, 0.0), (0.7, 0.7, 0.9), CLASSES.index("chair"), n // 4)
        box((sx - 0.5, 0.2, 0.0), (sx - 0.2, 0.5, 0.4), CLASSES.index("clutter"), n // 4)
        xyz = np.concatenate([p for p, _ in parts])
        xyz = xyz + rng.normal(0, 0.005, xyz.shape)  # scanner noise
        xyz -= xyz.min(axis=0)
        label = np.concatenate([np.full(len(p), c) for p, c in parts])
        rgb = rng.integers(0, 256, size=(len(xyz), 3))
        name = f"Area_{area}_room_{r}"
        rooms[name] = np.concatenate([xyz, rgb, label[:, None]], axis=1).astype(np.float32)
    return rooms


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """(max_c f_c / f_c)^(1/3) with f the normalised label histogram; a class absent
    from `labels` gets weight inf (never used: no target carries it)."""
    f = torch.bincount(labels.flatten(), minlength=NUM_CLASSES).double()
    f = f / f.sum()
    return (f.max() / f).pow(1 / 3).float()


def epoch_rooms(sizes: list[int], num_points: int, sample_rate: float = 1.0) -> torch.Tensor:
    """Room index of every sample slot of an epoch, in room order: total points x
    sample_rate / num_points slots shared out in proportion to the rooms' point counts, each
    room getting round(share x slots). The caller shuffles them."""
    total = sum(sizes)
    slots = int(total * sample_rate / num_points)
    counts = [int(round(n / total * slots)) for n in sizes]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(counts))


def sample_block(xyz: torch.Tensor, num_points: int = 2048, block_size: float = 1.0,
                 min_points: int = 1024, candidates: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training block of a room, drawn on xyz's device with its global RNG, with no
    host sync (no `.item()`, no `nonzero`: on a GPU the host never waits for it).

    A random point of the room is the centre; the block is every point with x and y within
    block_size / 2 of it (z unrestricted). The reference redraws the centre until its block
    has more than min_points points; here `candidates` centres are drawn at once and the first
    that qualifies is taken, which is the same distribution. Then num_points of the block's
    points, in random order: without replacement when it has enough, else uniformly with
    replacement. (The m smallest of iid random keys over the block's points are a uniform
    m-subset; with replacement, a uniform index into those sorted members.)

    If no candidate qualifies (vanishingly rare in S3DIS rooms), the fullest candidate block
    is taken instead of drawing more (which would need a sync), and `fallback` says so;
    semseg.py counts and reports these. A room of <= min_points points can never qualify and
    is an error.

    Returns point indices into xyz (num_points,), the block's points (num_points, 3) with x and
    y relative to the centre and z raw (the room-min-shifted height), and fallback (a 0-dim
    bool tensor).
    """
    n, dev = len(xyz), xyz.device
    if n <= min_points:
        raise BadInput(f"no block of {block_size} m can hold more than {min_points} points "
                       f"in a room of {n} points")
    half = block_size / 2
    centres = xyz[torch.randint(n, (candidates,), device=dev)]  # (K, 3)
    inside = ((xyz[:, None, 0] - centres[None, :, 0]).abs() <= half) \
        & ((xyz[:, None, 1] - centres[None, :, 1]).abs() <= half)  # (n, K)
    counts = inside.sum(dim=0)  # (K,)
    ok = counts > min_points
    fallback = ~ok.any()
    # First qualifying candidate (argmax returns the first maximum), else the fullest one;
    # kept as a 1-element tensor: indexing with it must not become a Python int (a sync).
    k = torch.where(fallback, counts.argmax(), ok.int().argmax()).view(1)
    member = inside.gather(1, k.expand(n, 1))[:, 0]  # (n,)
    count = counts[k]  # (1,)
    m = min(num_points, n)
    keys = torch.where(member, torch.rand(n, device=dev), 2.0)  # non-members sort last
    first = keys.topk(m, largest=False, sorted=True).indices  # the block's points first
    # With replacement: uniform over the `count` members, which come first in `first`.
    u = torch.rand(num_points, device=dev)
    pick = torch.minimum((u * count).long(), count - 1).clamp(max=m - 1)
    idx = first[pick]
    if m == num_points:
        idx = torch.where(count >= num_points, first, idx)
    points = xyz[idx].clone()
    points[:, :2] -= centres[k, :2]
    return idx, points, fallback


def sample_blocks(rooms: Rooms, room_ids: list[int], num_points: int, block_size: float = 1.0,
                  min_points: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of blocks, one from each listed room: points (b, num_points, 3), labels (b, n)
    and the number of fallback blocks (a 0-dim tensor, see `sample_block`). No host sync."""
    points, labels, fallbacks = [], [], []
    for r in room_ids:
        xyz, lab = rooms.room(r)
        idx, pts, fallback = sample_block(xyz, num_points, block_size, min_points)
        points.append(pts)
        labels.append(lab[idx])
        fallbacks.append(fallback)
    return torch.stack(points), torch.stack(labels), torch.stack(fallbacks).sum()


def window_chunks(xyz: torch.Tensor, num_points: int = 2048, block_size: float = 1.0,
                  stride: float = 0.5, padding: float = 0.001
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-room sliding-window cover of one voting pass, with the global RNG.

    Windows of block_size x block_size over x, y with `stride`, ceil((extent - block) / stride)
    + 1 per axis (at least 1: the reference gets 0 windows on an axis shorter than a block);
    a window past the far edge is shifted back to end at the room's maximum. Each non-empty
    window (bounds widened by `padding`) is padded with random duplicates of its own points to
    a multiple of num_points (without replacement when the padding is no larger than the
    window), shuffled and cut into chunks of num_points.

    Returns point indices (C, num_points) into xyz and the chunks' points (C, num_points, 3),
    x and y relative to the window centre, z raw. Every point lies in at least one window.
    """
    lo, hi = xyz[:, :2].amin(dim=0).tolist(), xyz[:, :2].amax(dim=0).tolist()
    grid = [max(1, math.ceil((h - l - block_size) / stride) + 1) for l, h in zip(lo, hi)]
    chunks, centres = [], []
    for iy in range(grid[1]):
        for ix in range(grid[0]):
            start = []
            for axis, i in ((0, ix), (1, iy)):
                end = min(lo[axis] + i * stride + block_size, hi[axis])
                start.append(end - block_size)
            sx, sy = start
            inside = ((xyz[:, 0] >= sx - padding) & (xyz[:, 0] <= sx + block_size + padding)
                      & (xyz[:, 1] >= sy - padding) & (xyz[:, 1] <= sy + block_size + padding))
            idx = inside.nonzero()[:, 0]
            n = len(idx)
            if n == 0:
                continue
            extra = math.ceil(n / num_points) * num_points - n
            if extra <= n:
                pad = idx[torch.randperm(n, device=xyz.device)[:extra]]
            else:
                pad = idx[torch.randint(n, (extra,), device=xyz.device)]
            idx = torch.cat([idx, pad])
            idx = idx[torch.randperm(len(idx), device=xyz.device)]
            chunks.append(idx.reshape(-1, num_points))
            centre = torch.tensor([sx + block_size / 2, sy + block_size / 2, 0.0],
                                  device=xyz.device)
            centres.append(centre.expand(len(chunks[-1]), 3))
    idx = torch.cat(chunks)  # (C, num_points)
    return idx, xyz[idx] - torch.cat(centres)[:, None]


def confusion(pred: torch.Tensor, target: torch.Tensor,
              num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted."""
    flat = target.flatten().long() * num_classes + pred.flatten().long()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(conf: torch.Tensor) -> dict:
    """The reference's metrics from summed confusion counts, over ALL classes:
    IoU_c = TP / (TP + FP + FN + 1e-6), acc_c = TP / (points of c + 1e-6), so a class absent
    from both ground truth and prediction counts as 0. OA = TP sum / points evaluated.
    `points` is that number: under DDP it shows that every point was counted exactly once."""
    conf = conf.double().cpu()
    tp = conf.diag()
    gt, pred = conf.sum(dim=1), conf.sum(dim=0)
    iou = tp / (gt + pred - tp + 1e-6)
    acc = tp / (gt + 1e-6)
    return {"miou": iou.mean().item(), "macc": acc.mean().item(),
            "oa": (tp.sum() / conf.sum().clamp(min=1)).item(), "points": int(conf.sum()),
            "iou": {c: v for c, v in zip(CLASSES, iou.tolist())}}
