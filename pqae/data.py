"""Point-cloud data: whole-dataset loaders, a procedural default corpus, and on-device sampling.

Design: a dataset is held WHOLE as one float32 tensor (S, N, 3) (ShapeNet-55 is
52,470 x 8192 x 3 = 5.2 GB, which fits in host RAM and GPU memory), and each training step
draws its batch on the device with `sample_points` — no DataLoader, no worker processes.

* `load_shapenet55`  ShapeNet-55 from the HDF5 written by `python -m data_prep.shapenet55`.
* `load_airplanes`   the real ModelNet40 airplane slice in `shared/data` (tests, smoke runs).
* `procedural_shapes` a small, deterministic corpus of random primitives; needs no files.
* `sample_points`    the reference per-sample pretraining transform, batched.
* `rotate_y`         row-vector rotation about y; also used by the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pqae.errors import BadInput, MissingFile, reading

SHAPENET55_POINTS = 8192
SHAPENET55_SHAPES = 52_470
"""train + test, the reference's pretraining set."""
SHAPENET55_FORMAT_VERSION = 1
AIRPLANES_POINTS = 2048
SPLITS = ("train", "test", "all")


# --------------------------------------------------------------------------------------------
# Checks shared by the loaders


def check_finite(points: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first sample (index along dim 0) holding NaN/inf.

    Works in chunks of samples so that checking a 5 GB tensor never allocates a 5 GB mask.
    """
    chunk = 1024
    for start in range(0, points.shape[0], chunk):
        bad = ~torch.isfinite(points[start : start + chunk]).flatten(1).all(dim=1)  # (chunk,)
        if bad.any():
            first = start + int(bad.nonzero()[0, 0])
            raise BadInput(f"{what}: sample {first} contains NaN or inf values")


MAX_COORD = 1e9
"""Largest coordinate a loader accepts: its square must not overflow float32 when a cloud is
normalised to the unit sphere (|x| beyond ~1.8e19 does), with a wide margin."""


def check_clouds(points: torch.Tensor, what: str, first: int = 0) -> None:
    """Refuse the clouds (along dim 0) that normalisation would turn into garbage: NaN or inf
    values, a coordinate beyond +-MAX_COORD (a cloud x1e30, one point at 1e25), or zero extent
    (every point the same: all zeros). The message names `what` and the first indices of each
    kind, counted in `points` (the split as the file holds it) from `first`. Works in chunks of
    clouds."""
    found: dict[str, list[int]] = {"NaN or inf values": [],
                                   f"coordinates beyond +-{MAX_COORD:g}": [],
                                   "zero extent (every point the same)": []}
    chunk = 1024
    for start in range(0, points.shape[0], chunk):
        x = points[start:start + chunk].float()  # (c, N, 3)
        finite = torch.isfinite(x).flatten(1).all(1)
        big = finite & (x.abs().flatten(1).amax(1) > MAX_COORD)
        flat = finite & ~big & (x.amax(1) == x.amin(1)).all(1)
        for kind, mask in zip(found, (~finite, big, flat)):
            found[kind] += (first + start + mask.nonzero().flatten()).tolist()[:10]
    bad = {k: v for k, v in found.items() if v}
    if bad:
        raise BadInput(f"{what}: cloud(s) that cannot be normalised: " + "; ".join(
            f"{kind} in sample(s) {', '.join(map(str, idx[:5]))}{' ...' if len(idx) > 5 else ''}"
            for kind, idx in bad.items()))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BadInput(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------------------------
# ShapeNet-55 (pretraining)


PRETRAIN_LAYOUT = (
    "groups 'train' and 'test', each with a dataset 'points' of shape (S, N, 3) (the same N in "
    f"both and in every file; ShapeNet-55: {SHAPENET55_POINTS}) and dtype float32 or float16")


def pretrain_files(path: str | Path) -> list[Path]:
    """The HDF5 files a pretraining --data-path names: one file, a directory (its `*.h5`
    files, sorted: the shards of `data_prep.folder --shard-size`), or several of these
    separated by commas, in that order."""
    files: list[Path] = []
    for part in str(path).split(","):
        p = Path(part.strip())
        if p.is_dir():
            shards = sorted(q for q in p.iterdir() if q.suffix in (".h5", ".hdf5") and q.is_file())
            if not shards:
                raise MissingFile(f"{p} is a directory without .h5 files; expected the shards "
                                  f"of `python -m data_prep.folder --shard-size K`")
            files += shards
        elif p.is_file():
            files.append(p)
        else:
            raise MissingFile(
                f"ShapeNet-55 file not found: {p}. Create it from the official release with "
                f"`python -m data_prep.shapenet55 --root data/ShapeNet55-34 --out {p}`, your "
                f"own clouds with `python -m data_prep.folder --root DIR --out {p}`, or try the "
                f"built-in data first: `python pretrain.py --preset tiny`")
    return files


@dataclass(frozen=True)
class CloudBlock:
    """One pretraining dataset ('train/points' or 'test/points' of one file): where its clouds
    are and how they are stored, read from the HDF5 metadata without reading the clouds."""
    path: Path
    group: str
    count: int  # clouds
    points: int  # N, points per cloud
    dtype: np.dtype
    offsets: np.ndarray | None  # byte offset of each run of clouds stored in one piece
    run: int  # clouds per such run (the whole dataset when contiguous, else its chunk)
    checked: bool  # written by a converter that already refused non-finite values

    @property
    def cloud_bytes(self) -> int:
        return self.points * 3 * self.dtype.itemsize


def pretrain_blocks(path: str | Path, split: str = "all") -> list[CloudBlock]:
    """Every pretraining dataset of `path` (see `pretrain_files`) for `split`, validated: the
    layout, one point count N and one dtype across all. Split "all" is test then train per
    file, the order the reference reads with `--whole`."""
    import h5py  # only the pretraining loaders need it

    _check_split(split)
    groups = ("test", "train") if split == "all" else (split,)
    blocks: list[CloudBlock] = []
    for file in pretrain_files(path):
        with reading(file, f"an HDF5 file with {PRETRAIN_LAYOUT}"), h5py.File(file, "r") as f:
            for g in groups:
                key = f"{g}/points"
                if key not in f:
                    raise BadInput(f"{file}: expected {PRETRAIN_LAYOUT}; found no '{key}' "
                                   f"(top-level keys: {sorted(f.keys())})")
                d = f[key]
                first = blocks[0] if blocks else None
                if d.ndim != 3 or d.shape[2] != 3 or d.shape[1] < 1 or \
                        d.dtype not in (np.float32, np.float16) or \
                        (first and d.shape[1] != first.points):
                    raise BadInput(
                        f"{file}: expected {PRETRAIN_LAYOUT}; found '{key}' with shape {d.shape} "
                        f"and dtype {d.dtype}" + (f" ({'the other group' if first.path == file else first.path}"
                                                  f" has N = {first.points})" if first else ""))
                offsets, run = _stored_runs(d)
                blocks.append(CloudBlock(file, g, d.shape[0], d.shape[1], np.dtype(d.dtype),
                                         offsets, run, bool(f.attrs.get("checked_finite", False))))
    return blocks


def _stored_runs(d) -> tuple[np.ndarray | None, int]:
    """(byte offsets, clouds per run) of a dataset's clouds in its file when they can be read
    straight from it: contiguous, or chunked along clouds only, unfiltered (the layouts our
    converters write); (None, 0) otherwise (compressed, or chunks that split a cloud)."""
    if d.shape[0] == 0:
        return np.zeros(0, np.int64), 1
    native = d.dtype.byteorder in ("=", "<", "|") if np.little_endian else d.dtype.byteorder != "<"
    if not native:
        return None, 0
    if d.chunks is None:
        offset = d.id.get_offset()
        return (None, 0) if offset is None else (np.array([offset], np.int64), d.shape[0])
    if d.compression or d.chunks[1:] != d.shape[1:] or len(d._filters):  # noqa: SLF001
        return None, 0
    n_chunks = -(-d.shape[0] // d.chunks[0])
    offsets = np.empty(n_chunks, np.int64)
    for i in range(n_chunks):
        info = d.id.get_chunk_info_by_coord((i * d.chunks[0], 0, 0))
        if info.byte_offset is None or info.filter_mask:
            return None, 0
        offsets[i] = info.byte_offset
    return offsets, d.chunks[0]


def load_shapenet55(path: str | Path, split: str = "all") -> torch.Tensor:
    """Load the pretraining clouds (S, N, 3) as float32 from HDF5 files in the layout of
    `data_prep.shapenet55` (ShapeNet-55: N = 8192) or `data_prep.folder` (any N, stored
    float32 or float16): one file, a directory of shards, or several separated by commas
    (`pretrain_files`), concatenated in that order.

    split "all" is test followed by train, the order the reference reads with `--whole`
    (the default): test.txt lines first, then train.txt — 10,518 + 41,952 = 52,470 shapes.
    """
    import h5py

    blocks = pretrain_blocks(path, split)
    # Read straight into one preallocated array: concatenating would need twice the RAM
    # (float16 is widened by HDF5 on the way).
    out = np.empty((sum(b.count for b in blocks), blocks[0].points, 3), np.float32)  # (S, N, 3)
    start = 0
    for b in blocks:
        with reading(b.path, f"an HDF5 file with {PRETRAIN_LAYOUT}"), h5py.File(b.path) as f:
            if b.count:
                f[f"{b.group}/points"].read_direct(out, dest_sel=np.s_[start:start + b.count])
        # indices within the group, as the user knows the file
        check_clouds(torch.from_numpy(out[start:start + b.count]), f"{b.path} '{b.group}/points'")
        start += b.count
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# ModelNet40 airplanes: a real slice shipped for tests (shared/data/modelnet40_airplanes)


def load_airplanes(path: str | Path, split: str = "all") -> torch.Tensor:
    """Load the real ModelNet40 airplane slice: (S, 2048, 3) float32.

    The .npz holds `points` (717, 2048, 3), `names` and `is_test` (the official split):
    "train" = 618 shapes, "test" = 99, "all" = 717 in file order.
    """
    _check_split(split)
    path = Path(path)
    if not path.is_file():
        raise MissingFile(
            f"airplane slice not found: {path}. --data airplanes reads an .npz with 'points' "
            f"(S, 2048, 3) float32 and 'is_test' (S,) bool; pass its path with --data-path, or "
            f"try the built-in data first: `python pretrain.py --preset tiny`")
    expected = (
        f"keys 'points' (S, {AIRPLANES_POINTS}, 3) float32 and 'is_test' (S,) bool"
    )
    with reading(path, f"an .npz with {expected}"), np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("points", "is_test") if k not in f.files]
        if missing:
            raise BadInput(f"{path}: expected {expected}; missing {missing} (has {f.files})")
        points, is_test = f["points"], f["is_test"]
    layout_ok = (
        points.ndim == 3
        and points.shape[1:] == (AIRPLANES_POINTS, 3)
        and points.dtype == np.float32
        and is_test.shape == (points.shape[0],)
        and is_test.dtype == np.bool_
    )
    if not layout_ok:
        raise BadInput(
            f"{path}: expected {expected}; found 'points' {points.shape} {points.dtype} and "
            f"'is_test' {is_test.shape} {is_test.dtype}"
        )
    check_clouds(torch.from_numpy(points), f"{path} 'points'")  # indices as in the file
    if split != "all":
        points = points[is_test if split == "test" else ~is_test]
    return torch.from_numpy(np.ascontiguousarray(points))


# --------------------------------------------------------------------------------------------
# Procedural corpus: the built-in default data set (no files)

# Primitive ids. Each primitive is centred near the origin with size ~1 before scaling.
_SPHERE, _BOX, _CYLINDER, _CONE, _TORUS = range(5)
_NUM_PRIMITIVES = 5
_UNION = _NUM_PRIMITIVES  # shape kind: two primitives at a random offset


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _random_rotations(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3, 3) rotation matrices, uniform over SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=g)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).view(n, 3, 3)


def _ellipsoid(n: int, p: int, g: torch.Generator) -> torch.Tensor:
    # Uniform directions stretched by the radii: exactly area-uniform for a sphere, close enough
    # for a mildly stretched ellipsoid.
    d = torch.randn(n, p, 3, generator=g)
    d = d / d.norm(dim=2, keepdim=True).clamp_min(1e-12)
    radii = _uniform(g, (n, 1, 3), 0.5, 1.0)
    return d * radii  # (n, p, 3)


def _box(n: int, p: int, g: torch.Generator) -> torch.Tensor:
    half = _uniform(g, (n, 3), 0.3, 1.0)  # half extents (n, 3)
    # Pick which axis a point's face is normal to, proportional to that face pair's area.
    area = torch.stack(
        [half[:, 1] * half[:, 2], half[:, 0] * half[:, 2], half[:, 0] * half[:, 1]], dim=1
    )
    axis = torch.multinomial(area, p, replacement=True, generator=g)  # (n, p)
    u = _uniform(g, (n, p, 3), -1.0, 1.0)
    sign = torch.randint(0, 2, (n, p), generator=g).float() * 2 - 1
    u.scatter_(2, axis[..., None], sign[..., None])  # that coordinate sits on the face, ±1
    return u * half[:, None]


def _cylinder(n: int, p: int, g: torch.Generator) -> torch.Tensor:
    r = _uniform(g, (n, 1), 0.3, 0.8)
    h = _uniform(g, (n, 1), 0.3, 1.0)  # half height
    side, cap = 2 * math.pi * r * 2 * h, 2 * math.pi * r * r  # (n, 1) areas
    on_side = torch.rand(n, p, generator=g) < side / (side + cap)  # (n, p)
    theta = _uniform(g, (n, p), 0.0, 2 * math.pi)
    # Side: radius r, y uniform; caps: sqrt for a uniform disc, y = ±h.
    rad = torch.where(on_side, r.expand(n, p), r * torch.rand(n, p, generator=g).sqrt())
    cap_y = (torch.randint(0, 2, (n, p), generator=g).float() * 2 - 1) * h
    y = torch.where(on_side, _uniform(g, (n, p), -1.0, 1.0) * h, cap_y)
    return torch.stack([rad * theta.cos(), y, rad * theta.sin()], dim=2)


def _cone(n: int, p: int, g: torch.Generator) -> torch.Tensor:
    r = _uniform(g, (n, 1), 0.3, 0.9)
    h = _uniform(g, (n, 1), 0.6, 1.6)  # apex at y = h/2, base at y = -h/2
    side, base = math.pi * r * (r * r + h * h).sqrt(), math.pi * r * r
    on_side = torch.rand(n, p, generator=g) < side / (side + base)
    theta = _uniform(g, (n, p), 0.0, 2 * math.pi)
    # Lateral area grows linearly with distance from the apex, so t = sqrt(u) is uniform on it.
    t = torch.rand(n, p, generator=g).sqrt()
    rad = r * torch.where(on_side, t, torch.rand(n, p, generator=g).sqrt())
    y = torch.where(on_side, h / 2 - h * t, -h / 2)
    return torch.stack([rad * theta.cos(), y, rad * theta.sin()], dim=2)


def _torus(n: int, p: int, g: torch.Generator) -> torch.Tensor:
    big = _uniform(g, (n, 1), 0.5, 0.8)  # ring radius
    small = big * _uniform(g, (n, 1), 0.2, 0.5)  # tube radius, < half the ring radius
    # Surface density is proportional to (R + r cos phi): rejection sampling with a fixed
    # output size. Draw 3p candidates, key accepted ones below 1 and rejected ones above,
    # keep the p smallest keys. Acceptance is >= 2/3 on average, so falling back to a rejected
    # candidate is astronomically rare (and still yields a valid surface point).
    k = 3 * p
    phi = _uniform(g, (n, k), 0.0, 2 * math.pi)  # around the tube
    accept = torch.rand(n, k, generator=g) * (big + small) < big + small * phi.cos()
    keys = torch.rand(n, k, generator=g) + (~accept).float()
    phi = phi.gather(1, keys.topk(p, dim=1, largest=False).indices)  # (n, p)
    theta = _uniform(g, (n, p), 0.0, 2 * math.pi)  # around the ring
    rad = big + small * phi.cos()
    return torch.stack([rad * theta.cos(), small * phi.sin(), rad * theta.sin()], dim=2)


_PRIMITIVES = (_ellipsoid, _box, _cylinder, _cone, _torus)


def _primitives(kinds: torch.Tensor, p: int, g: torch.Generator) -> torch.Tensor:
    """Surface samples (n, p, 3) of one randomly rotated primitive per entry of kinds (n,)."""
    out = torch.empty(kinds.shape[0], p, 3)
    for kind, fn in enumerate(_PRIMITIVES):  # loop over the 5 types, never over points
        rows = (kinds == kind).nonzero()[:, 0]
        if rows.numel():
            out[rows] = fn(rows.numel(), p, g)
    return out @ _random_rotations(kinds.shape[0], g)  # rotate about all axes


def procedural_shapes(
    num_shapes: int = 1024, num_points: int = 2048, seed: int = 0
) -> torch.Tensor:
    """A deterministic corpus of surface point clouds of random primitives: (S, N, 3) float32.

    Six kinds, equally likely: ellipsoid, box, cylinder, cone, torus, and the union of two
    primitives of random kinds and sizes at a random offset. Each primitive is randomly
    rotated about all axes; each shape is then scaled anisotropically (per axis, x0.75..1.25),
    its points shuffled (no structure in the point order, like real scans), and normalised to
    the unit sphere. Same seed -> identical tensor; drawn from a private torch.Generator, so
    the global RNG is untouched.
    """
    if num_shapes < 1 or num_points < 2:
        raise BadInput(f"need num_shapes >= 1, num_points >= 2; got {num_shapes}, {num_points}")
    g = torch.Generator().manual_seed(seed)
    s, p = num_shapes, num_points
    kind = torch.randint(0, _NUM_PRIMITIVES + 1, (s,), generator=g)  # (S,)
    points = _primitives(torch.randint(0, _NUM_PRIMITIVES, (s,), generator=g), p, g)

    # Unions: the second part replaces a random share (30-70%) of the points, so the point
    # budget stays fixed and neither part dominates. The part is shrunk and moved off-centre
    # so the two overlap or touch rather than nest.
    union = (kind == _UNION).nonzero()[:, 0]
    if union.numel():
        u = union.numel()
        part = _primitives(torch.randint(0, _NUM_PRIMITIVES, (u,), generator=g), p, g)
        part = part * _uniform(g, (u, 1, 1), 0.4, 0.9)
        offset = torch.randn(u, 1, 3, generator=g)
        offset = offset / offset.norm(dim=2, keepdim=True) * _uniform(g, (u, 1, 1), 0.5, 1.0)
        take = torch.arange(p) < (_uniform(g, (u, 1), 0.3, 0.7) * p)  # (u, p) mask
        points[union] = torch.where(take[..., None], part + offset, points[union])

    points = points * _uniform(g, (s, 1, 3), 0.75, 1.25)  # anisotropic scale
    perm = torch.rand(s, p, generator=g).argsort(dim=1)  # (S, N)
    points = points.gather(1, perm[..., None].expand(-1, -1, 3))
    return _unit_sphere(points)


# --------------------------------------------------------------------------------------------
# Per-step sampling and augmentation (on whatever device the data lives)


def _unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud of (B, N, 3) on its centroid and scale its max point norm to 1."""
    points = points - points.mean(dim=1, keepdim=True)
    # clamp: a cloud collapsed to one point would otherwise become NaN and poison training.
    scale = points.norm(dim=2).amax(dim=1).clamp_min(1e-12)  # (B,)
    return points / scale[:, None, None]


def sample_points(clouds: torch.Tensor, idx: torch.Tensor, num_points: int) -> torch.Tensor:
    """The reference pretraining transform, batched: (B, num_points, 3).

    clouds (S, N, 3), idx (B,) long: for each selected cloud, a uniformly random subset of
    num_points of its N points without replacement, in random order (the first num_points of
    a random permutation), THEN unit-sphere normalised on that subset. Randomness comes from
    the global torch RNG of clouds' device, so the caller controls seeding.
    """
    idx = idx.to(clouds.device)
    return gather_unit_sphere(clouds, idx, draw_subsets(idx.shape[0], clouds.shape[1],
                                                        num_points, clouds.device))


def draw_subsets(batch: int, n: int, num_points: int, device) -> torch.Tensor:
    """sample_points's draw: (batch, num_points) indices, each row the first num_points of a
    uniformly random permutation of range(n)."""
    if num_points > n:
        raise BadInput(f"num_points={num_points} exceeds the {n} points per cloud")
    keys = torch.rand(batch, n, device=device)  # (B, N)
    # Argsort of iid uniform keys is a uniform random permutation; keep its first num_points.
    return keys.argsort(dim=1)[:, :num_points]  # (B, num_points)


def gather_unit_sphere(clouds: torch.Tensor, idx: torch.Tensor, pick: torch.Tensor
                       ) -> torch.Tensor:
    """sample_points given its draw: the clouds idx (B,), their points pick (B, n), unit-sphere
    normalised; gathers only what is used."""
    return _unit_sphere(clouds[idx[:, None], pick])


def rotate_y(points: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each cloud about the y axis (row-vector convention).

    points (B, N, 3), angles (B,) radians: (x, y, z) -> (x cos a - z sin a, y, x sin a + z cos a).
    Returns a new tensor (the reference rotates in place; nothing here relies on that).
    """
    c = angles.cos()[:, None]  # (B, 1)
    s = angles.sin()[:, None]
    x, y, z = points.unbind(dim=2)  # each (B, N)
    return torch.stack([x * c - z * s, y, x * s + z * c], dim=2)


# --------------------------------------------------------------------------------------------
# Classification data (ScanObjectNN, ModelNet40): whole splits as (points, labels) tensors

SCANOBJECTNN_POINTS = 2048
SCANOBJECTNN_CLASSES = 15
MODELNET40_POINTS = 8192
MODELNET40_CLASSES = 40
CLS_FORMAT_VERSION = 1


def _load_labelled_h5(path: str | Path, split: str, num_points: int, num_classes: int,
                      what: str, how_to_make: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `<split>/points` (S, num_points, 3) float32 and `<split>/labels` (S,) int64 of a
    classification HDF5 written by data_prep, checking layout, label range and finiteness.
    A user's own set (`data_prep.folder --labels`, which records its `source_root`) may hold
    any number of points per cloud."""
    import h5py

    if split not in ("train", "test"):
        raise BadInput(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{what} file not found: {path}. Create it with `{how_to_make}`, or "
                          f"try the built-in data first: `python finetune_cls.py --preset tiny`")
    expected = (f"groups 'train' and 'test', each with 'points' (S, {num_points}, 3) float32 "
                f"and 'labels' (S,) int64 in [0, {num_classes})")
    with reading(path, f"an HDF5 file with {expected}"), h5py.File(path, "r") as f:
        if f"{split}/points" not in f or f"{split}/labels" not in f:
            raise BadInput(f"{path}: expected {expected}; found top-level keys {sorted(f.keys())}"
                           + (f", '{split}' holds {sorted(f[split].keys())}" if split in f else ""))
        points, labels = f[f"{split}/points"][()], f[f"{split}/labels"][()]
        if "source_root" in f.attrs and points.ndim == 3:  # data_prep.folder: its own count
            num_points = points.shape[1]
    if (points.ndim != 3 or points.shape[1:] != (num_points, 3) or points.dtype != np.float32
            or labels.shape != (points.shape[0],) or not np.issubdtype(labels.dtype, np.integer)):
        raise BadInput(f"{path}: expected {expected}; found '{split}/points' {points.shape} "
                       f"{points.dtype} and '{split}/labels' {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BadInput(f"{path}: '{split}/labels' outside [0, {num_classes}): "
                       f"min {labels.min()}, max {labels.max()}")
    out = torch.from_numpy(points)
    check_clouds(out, f"{path} '{split}/points'")
    return out, torch.from_numpy(labels.astype(np.int64))


def load_scanobjectnn(path: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ScanObjectNN (one variant) from `python -m data_prep.scanobjectnn`:
    points (S, 2048, 3) as stored (the reference does not normalise), labels (S,)."""
    name = Path(path).name.lower()
    variant = next((v for v in ("objonly", "hardest", "objbg") if v in name), "objbg")
    return _load_labelled_h5(path, split, SCANOBJECTNN_POINTS, SCANOBJECTNN_CLASSES, "ScanObjectNN",
                             f"python -m data_prep.scanobjectnn --root data/ScanObjectNN "
                             f"--variant {variant} --out {path}")


def load_modelnet40(path: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelNet40 from `python -m data_prep.modelnet40`: points (S, 8192, 3), each cloud
    unit-sphere normalised over all its 8192 points (before any subsampling), in the
    stored point order; labels (S,)."""
    points, labels = _load_labelled_h5(
        path, split, MODELNET40_POINTS, MODELNET40_CLASSES, "ModelNet40",
        f"python -m data_prep.modelnet40 --root data/ModelNet/modelnet40_normal_resampled "
        f"--out {path}")
    return _unit_sphere(points), labels


def procedural_classes(num_shapes: int, num_points: int = 1024, num_classes: int = 5,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable problem of up to 5 classes for tests and CPU smoke runs: the class is the
    primitive kind (ellipsoid, box, cylinder, cone, torus, in that order), randomly rotated,
    anisotropically scaled, shuffled and unit-sphere normalised like `procedural_shapes`.
    Balanced labels (i % num_classes)."""
    if not 1 <= num_classes <= _NUM_PRIMITIVES:
        raise BadInput(f"num_classes must be in 1..{_NUM_PRIMITIVES}, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_shapes) % num_classes
    points = _primitives(labels, num_points, g) * _uniform(g, (num_shapes, 1, 3), 0.75, 1.25)
    perm = torch.rand(num_shapes, num_points, generator=g).argsort(dim=1)
    points = points.gather(1, perm[..., None].expand(-1, -1, 3))
    return _unit_sphere(points), labels


def point_all_for(num_points: int, available: int) -> int:
    """How many FPS points the train-time subset is drawn from, capped at `available`."""
    return min({1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}.get(num_points, num_points),
               available)


def fps_gather(points: torch.Tensor, m: int) -> torch.Tensor:
    """(B, N, 3) -> (B, m, 3): the FPS points (start at index 0) in FPS order. Used on
    clouds the loaders have checked for NaN, so the kernel's NaN guard (a host sync on the
    GPU) is skipped."""
    import kernels  # local: only the classification sampling needs the point kernels

    idx = kernels.fps(points, m, check=False)  # (B, m)
    return points.gather(1, idx[..., None].expand(-1, -1, 3))


def full_fps_indices(points: torch.Tensor) -> torch.Tensor:
    """The indices `kernels.fps(points, N)` picks from all N points, as a multiset, found
    without FPS's N sequential steps (a few sorts instead). Only the order differs: this is
    index 0, then index order, where FPS gives FPS order.

    FPS from N to N points picks index 0, then every distinct coordinate once, by the lowest
    index that holds it, skipping points near the origin (|p|^2 < 1e-3, as the FPS op) and the
    coordinates of point 0. While such a point is left, its running distance is > 0 and it
    beats every picked point (distance 0). After that every score is 0, so the remaining picks
    are the lowest index not near the origin (or 0 when all are). (Exact as long as distinct
    points are not so close that their squared distance underflows to 0 in float32.)
    points (B, N, 3) -> (B, N) int64. Sync-free.
    """
    from kernels.reference import FPS_ORIGIN_EPS  # the FPS op's near-origin threshold

    x = points.to(torch.float32)
    B, N, _ = x.shape
    arange = torch.arange(N, device=x.device).expand(B, N)
    order = arange
    for c in (2, 1, 0):  # stable sorts, last key first: lexicographic (x, y, z), ties by index
        order = order.gather(1, x[..., c].gather(1, order).argsort(dim=1, stable=True))
    xs = x.gather(1, order[..., None].expand(-1, -1, 3))  # (B, N, 3), sorted
    repeat = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    repeat[:, 1:] = (xs[:, 1:] == xs[:, :-1]).all(dim=-1)  # same coordinate as the one before
    far = ((x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1]) + x[..., 2] * x[..., 2]) \
        >= FPS_ORIGIN_EPS  # (B, N): may be picked after the first
    first = torch.zeros_like(repeat).scatter_(1, order, ~repeat)  # lowest index of its coordinate
    pick = first & far & ~(x == x[:, :1]).all(dim=-1)  # (B, N)
    count = pick.sum(dim=1, keepdim=True)  # (B, 1), at most N - 1
    picked = torch.where(pick, arange, arange + N).argsort(dim=1)[:, :N - 1]  # picks first
    lowest_far = torch.where(far.any(dim=1), far.int().argmax(dim=1), 0)[:, None]
    rest = torch.where(arange[:, :N - 1] < count, picked, lowest_far)
    return torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), rest], dim=1)


def shuffle_points(points: torch.Tensor) -> torch.Tensor:
    """A random point order per cloud (global RNG of the device): the reference's datasets
    shuffle train samples, which randomises where FPS starts."""
    perm = torch.rand(points.shape[:2], device=points.device).argsort(dim=1)  # (B, N)
    return points.gather(1, perm[..., None].expand(-1, -1, 3))


def draw_augmentation(kind: str, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample parameters (n, k) of a reference train/vote transform, drawn on
    `device` from `generator` (or that device's global RNG): "rotate" -> angle U[0, 2pi) about
    y (n, 1); "scale_translate" -> scale U(2/3, 3/2)^3 and shift U(-0.2, 0.2)^3 (n, 6);
    "none" -> (n, 0). Training draws on its device (no copy); evaluation draws on the CPU
    for the whole test set, so a sample's vote does not depend on the sharding."""
    if kind == "rotate":
        return torch.rand(n, 1, generator=generator, device=device) * 2 * math.pi
    if kind == "scale_translate":
        scale = 2 / 3 + (3 / 2 - 2 / 3) * torch.rand(n, 3, generator=generator, device=device)
        shift = -0.2 + 0.4 * torch.rand(n, 3, generator=generator, device=device)
        return torch.cat([scale, shift], dim=1)
    if kind == "none":
        return torch.zeros(n, 0, device=device)
    raise BadInput(f"augmentation must be 'rotate', 'scale_translate' or 'none', got {kind!r}")


def apply_augmentation(kind: str, points: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply `draw_augmentation`'s parameters (B, k) to (B, N, 3): rotation about y, or
    `PointcloudScaleAndTranslate` p * s + t, or nothing."""
    params = params.to(points.device)
    if kind == "rotate":
        return rotate_y(points, params[:, 0])
    if kind == "scale_translate":
        return points * params[:, None, :3] + params[:, None, 3:]
    return points
