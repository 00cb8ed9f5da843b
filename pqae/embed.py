"""Embeddings from a pretrained encoder: in Python, or a whole data set into one HDF5 file.

    import pqae
    encoder = pqae.load_encoder("runs/pretrain/ckpt-final", device="cuda")
    features = encoder.embed(points)                          # (B, N, 3) -> (B, 2C), e.g. (B, 768)
    patches, centers = encoder.embed(points, level="patch")   # (B, G, C), (B, G, 3)
    per_point, used = encoder.embed(points, level="point")    # (B, n, C), (B, n, 3)

    python -m pqae.embed --ckpt runs/pretrain/ckpt-final --data data/modelnet40.h5 --out feats.h5
    python -m pqae.embed --ckpt ... --data data/shards/ --level patch --out patches.h5
    python -m pqae.embed --ckpt ... --data my_scans/ --level point --out points.h5 --resume
    python -m pqae.embed --ckpt random --like runs/pretrain/ckpt-final --data ... --out base.h5

`load_encoder` builds the encoder from the checkpoint's own config (ours; a converted reference
checkpoint gets the reference's settings), loads it strictly and puts it in eval mode, so its
BatchNorm uses the running statistics of pretraining. `embed` prepares the clouds as
pretraining saw them (FPS down to the checkpoint's point count when a cloud has more, then
centre and unit-sphere scale), groups them with the pretraining grouping and runs the encoder.
It is batched, takes torch tensors (outputs stay on the encoder's device) or NumPy arrays
(outputs are NumPy), and one cloud (N, 3) as well as a batch (the outputs then have no batch
dimension). A cloud with a NaN or inf coordinate is refused, by its index.

Levels (C: the encoder's width, 384 for the reference; G: its patches, 64; n = min(N, the
checkpoint's point count, 1024 for the reference)):
* global: the classifier's features, concat[class token, max over the patch outputs] (B, 2C);
* patch: the G patch outputs (B, G, C), after the encoder's final LayerNorm (the tokens whose
  max the global level takes), and the patch centres (B, G, 3);
* point: one feature per point the encoder used (the cloud itself, or its FPS subset when it
  has more points), interpolated from the patch outputs of the 3 nearest centres with weights
  1 / squared distance, normalised (the segmentation heads' feature propagation,
  `pqae.segmentation.propagate`, without any learned layer) (B, n, C), and those points
  (B, n, 3): rows of the input cloud, as given.
Coordinates are in the frame of the input clouds (the encoder saw them centred and scaled).

`python -m pqae.embed` writes one HDF5 file, S clouds in the order of --data:
* `features`: (S, 2C) global, (S, G, C) patch, (S, n, C) point; float32 for global, float16
  for patch and point (half the file; --dtype);
* patch: `centers` (S, G, 3) float32;
* point: `points` (S, n, 3) float32, `index` (S, n) int32 (their rows in the input cloud) and
  `count` (S,) int32 (valid rows: a cloud of a folder with fewer than n points is padded with
  zero features, NaN points and index -1);
* from the input: `labels` (S,) int64 and the attribute `classes` (a classification file),
  `names` (S,) (a folder: the file paths relative to it; a classification file's names),
  `is_test` (S,) bool (an HDF5 input);
* attributes: `level`, `done` (clouds written), `clouds` (S), `data`, `split`, `dtype`,
  `encoder` (JSON: checkpoint, settings, a SHA-256 of the weights), `source` (JSON: what was
  read; for an HDF5 input, each file and group with its first row and count).
It is written as `<out>.tmp`: `done` is advanced and the file flushed after every chunk of
--batch-size clouds, and the file is renamed to `<out>` when complete. A killed run continues
where it stopped with --resume. An existing `<out>` is replaced only with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

import kernels
from pqae import checkpoint as ckpt
from pqae.data import _unit_sphere, pretrain_blocks
from pqae.errors import BadInput, MissingFile, reading
from pqae.log import finish, format_eta
from pqae.model import PointEncoder
from pqae.segmentation import propagate

# What a checkpoint without a config (a converted reference one) was pretrained with.
REFERENCE = {"dim": 384, "depth": 12, "heads": 6, "embed_hidden": 128, "num_group": 64,
             "group_size": 32, "num_points": 1024}
LEVELS = ("global", "patch", "point")
PROPAGATE_K = 3
"""centres each point interpolates from, as the segmentation heads' feature propagation."""


class PointEmbedder(nn.Module):
    """A PointEncoder with the grouping and the point count it was pretrained with."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, embed_hidden: int = 128,
                 num_group: int = 64, group_size: int = 32, num_points: int = 1024):
        super().__init__()
        self.num_group, self.group_size, self.num_points = num_group, group_size, num_points
        self.encoder = PointEncoder(dim, depth, heads, 0.0, embed_hidden)

    @property
    def dim(self) -> int:
        """Width of the global features (2 x the encoder's width)."""
        return 2 * self.encoder.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw clouds (B, N, 3) -> the points the encoder uses, as given, (B, n, 3) with
        n = min(N, num_points), and their rows in the input (B, n) int64: FPS from each cloud's
        first point when N > num_points (in FPS order), else the whole cloud."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise BadInput(f"embed expects clouds of shape (B, N, 3); got {tuple(points.shape)}")
        B, N, _ = points.shape
        if N < self.num_group:
            raise BadInput(f"clouds of {N} points are fewer than the {self.num_group} patches "
                           f"of this encoder")
        if N > self.num_points:
            index = kernels.fps(points, self.num_points, check=False)  # (B, n)
            return points.gather(1, index[..., None].expand(-1, -1, 3)), index
        return points, torch.arange(N, device=points.device).expand(B, N)

    def prepare(self, points: torch.Tensor) -> torch.Tensor:
        """Raw clouds (B, N, 3) -> (B, min(N, num_points), 3) float32 as pretraining fed them:
        `sample`, then centred and scaled into the unit sphere."""
        return _unit_sphere(self.sample(points)[0].float())

    def tokens(self, points: torch.Tensor):
        """Prepared clouds (B, n, 3) -> class token (B, C), patch outputs (B, G, C) and patch
        centres (B, G, 3), in the prepared frame."""
        neighborhood, center = kernels.group(points, self.num_group, self.group_size, check=False)
        cls, patches = self.encoder(neighborhood, center)
        return cls, patches, center

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Prepared clouds (B, n, 3) -> (B, 2C): concat[class token, max over patches]."""
        cls, patches, _ = self.tokens(points)
        return torch.cat([cls, patches.amax(dim=1)], dim=-1)

    @torch.no_grad()
    def embed_batch(self, points: torch.Tensor, level: str = "global") -> dict[str, torch.Tensor]:
        """One batch of raw clouds (B, N, 3) on the encoder's device -> the outputs of `level`,
        float32 on the device, coordinates in the input's frame:
        global {features (B, 2C)}; patch {features (B, G, C), centers (B, G, 3)};
        point {features (B, n, C), points (B, n, 3), index (B, n) int64: rows in the input}."""
        if level not in LEVELS:
            raise BadInput(f"level must be one of {', '.join(LEVELS)}; got {level!r}")
        if level == "global":
            return {"features": self.features(self.prepare(points))}
        used, index = self.sample(points)
        used = used.float()
        prepared = _unit_sphere(used)  # as `prepare`: the global level's numbers
        _, patches, centers = self.tokens(prepared)
        if level == "patch":
            # Undo the unit-sphere normalisation: centre + scale of each cloud, as _unit_sphere.
            mean = used.mean(dim=1, keepdim=True)  # (B, 1, 3)
            scale = (used - mean).norm(dim=2).amax(dim=1).clamp_min(1e-12)  # (B,)
            return {"features": patches, "centers": centers * scale[:, None, None] + mean}
        # Feature propagation in the frame the encoder saw (the weights are scale-invariant).
        return {"features": propagate(prepared, centers, patches, PROPAGATE_K),
                "points": used, "index": index}

    @torch.no_grad()
    def embed(self, points: torch.Tensor | np.ndarray, batch_size: int = 256,
              level: str = "global"):
        """Raw clouds -> features, computed `batch_size` clouds at a time.

        points: (B, N, 3) or one cloud (N, 3), any N >= num_group; a torch tensor (on any
        device: each batch is moved to the encoder's) or a NumPy array. Returns float32,
        on the encoder's device (NumPy arrays for a NumPy input), with n = min(N, num_points):
        * "global": features (B, 2C);
        * "patch": (features (B, G, C), centers (B, G, 3));
        * "point": (features (B, n, C), points (B, n, 3));
        without the batch dimension for one cloud (N, 3). A cloud with a NaN or inf
        coordinate is a BadInput naming its index."""
        if self.training:
            raise BadInput("embed runs in eval mode (call .eval() after training it)")
        if level not in LEVELS:
            raise BadInput(f"level must be one of {', '.join(LEVELS)}; got {level!r}")
        as_numpy = isinstance(points, np.ndarray)
        if as_numpy and not np.issubdtype(points.dtype, np.floating):
            points = points.astype(np.float32)
        one = points.ndim == 2
        x = points[None] if one else points
        if x.ndim != 3 or x.shape[-1] != 3:
            raise BadInput(f"embed expects clouds of shape (B, N, 3) or one cloud (N, 3); got "
                           f"{tuple(points.shape)}")
        outs = []
        for i in range(0, x.shape[0], batch_size):
            # A NumPy batch is copied on its own: a memory-mapped file is read a batch at a time.
            batch = x[i:i + batch_size]
            batch = (torch.from_numpy(np.array(batch)) if as_numpy else batch).to(self.device)
            bad = first_non_finite(batch)
            if bad is not None:
                raise BadInput(f"cloud {i + bad} of the input has NaN or inf coordinates; drop "
                               f"those points (or that cloud) first")
            outs.append(self.embed_batch(batch, level))
        if outs:
            out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        else:  # no clouds: the shapes they would have had
            n, G, C = min(x.shape[1], self.num_points), self.num_group, self.encoder.dim
            shapes = {"global": {"features": (0, 2 * C)},
                      "patch": {"features": (0, G, C), "centers": (0, G, 3)},
                      "point": {"features": (0, n, C), "points": (0, n, 3)}}[level]
            out = {k: torch.zeros(s, device=self.device) for k, s in shapes.items()}
        result = [out[k] for k in {"global": ("features",), "patch": ("features", "centers"),
                                   "point": ("features", "points")}[level]]
        if one:
            result = [r[0] for r in result]
        if as_numpy:
            result = [r.cpu().numpy() for r in result]
        return result[0] if level == "global" else tuple(result)

    forward = embed


def first_non_finite(points: torch.Tensor) -> int | None:
    """Index of the first cloud of (B, N, 3) with a NaN or inf coordinate, or None (one host
    sync)."""
    ok = torch.isfinite(points).flatten(1).all(dim=1)  # (B,)
    if bool(ok.all()):
        return None
    return int((~ok).nonzero()[0, 0])


def encoder_config(path: str | Path) -> dict:
    """The embedder's settings for a pretraining checkpoint: its config (ours) or the
    reference's, with dim, depth and embed_hidden read off the weights when there is no config."""
    saved = ckpt.checkpoint_config(path) or {}
    shape = ckpt.encoder_shape(path)  # raises for a file with no encoder in it
    out = {k: saved.get(k, REFERENCE[k]) for k in REFERENCE}
    out.update({k: v for k, v in shape.items() if v is not None})
    return out


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> PointEmbedder:
    """The pretrained encoder of a pretraining checkpoint (directory or .safetensors, ours or
    converted from the reference), built from the checkpoint's own config, loaded strictly,
    in eval mode on `device`. A file that is not a pretraining checkpoint is an error that
    says what it holds."""
    model = PointEmbedder(**encoder_config(path))
    ckpt.load_pretrained_encoder(model.encoder, path)
    return model.to(device).eval()


def encoder_for(ckpt: str, like: str, device, seed: int) -> tuple[PointEmbedder, str]:
    """(the embedder, how to name it) of a --ckpt flag: a checkpoint, or `random` (shaped like
    the checkpoint `like`, else the reference) as a baseline."""
    if ckpt == "random":
        return (random_encoder(like or None, device, seed),
                f"a random encoder shaped like {like or 'the reference'}")
    return load_encoder(ckpt, device), ckpt


def random_encoder(like: str | Path | None = None, device: str | torch.device = "cpu",
                   seed: int = 0) -> PointEmbedder:
    """A randomly initialised encoder (the pretraining init) of the same shape and grouping as
    the checkpoint `like` (the reference's without one), in eval mode: the baseline every
    pretrained encoder must beat. Its BatchNorm has never seen data (running mean 0, var 1)."""
    torch.manual_seed(seed)
    config = encoder_config(like) if like else dict(REFERENCE)
    return PointEmbedder(**config).to(device).eval()


# --------------------------------------------------------------------------------------------
# python -m pqae.embed: a data set into one HDF5 file


@dataclass(frozen=True)
class Config:
    ckpt: str = ""
    """pretraining checkpoint (directory or .safetensors, ours or converted); `random`: a
    randomly initialised encoder of the shape of --like (the reference's without it)."""
    like: str = ""
    """with --ckpt random: the checkpoint whose shape and grouping the random encoder takes."""
    data: str = ""
    """the clouds: an HDF5 file (pretraining: `train/points`, `test/points`; or a
    classification file, whose labels and class names are copied), a directory of .h5 shards
    (all, sorted), an .npy (S, N, 3) or (N, 3), or a folder of point-cloud files, one cloud
    each (read as `data_prep.folder` reads them; non-finite rows dropped)."""
    out: str = ""
    """the HDF5 file to write (as <out>.tmp until complete)."""
    level: Literal["global", "patch", "point"] = "global"
    """global: (S, 2C) per cloud; patch: (S, G, C) patch outputs and their centres; point:
    (S, n, C) interpolated to the n points the encoder used, and those points."""
    split: Literal["all", "train", "test"] = "all"
    """the groups of an HDF5 input; all: test then train of each file, the order pretraining
    reads them (`is_test` says which)."""
    dtype: Literal["auto", "float32", "float16"] = "auto"
    """stored type of the features; auto: float32 for global, float16 (half the file) for
    patch and point. Coordinates are stored float32."""
    batch_size: int = 256
    """clouds per batch; also the chunk after which the output is flushed and `done` advanced."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    resume: bool = False
    """continue the unfinished <out>.tmp of a run with the same settings."""
    overwrite: bool = False
    """replace an existing <out> (and any unfinished <out>.tmp)."""
    log_every: float = 10.0
    """seconds between progress lines (the first and the last chunk always print one)."""
    seed: int = 0
    """seed of the random encoder (--ckpt random)."""


FORMAT_VERSION = 1


class Clouds:
    """The clouds of --data, read a chunk at a time: a data set never sits in memory whole.
    `read(start, stop)` -> float32 (stop - start, N, 3), or a list of (N_i, 3) for a folder."""
    kind = ""
    points: int | None = None  # N of every cloud (None: a folder, each its own)
    names: list[str] | None = None
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    is_test: np.ndarray | None = None
    source: list | dict | None = None  # what was read, recorded to refuse a resume on other data

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int):
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Cloud i, named as the user knows it."""
        raise NotImplementedError


class HDF5Clouds(Clouds):
    """`<group>/points` (S, N, 3) of one file or of a directory of shards (pqae.data's
    pretraining layout; a classification file has it too), with its labels and names."""
    kind = "HDF5"

    def __init__(self, path: str | Path, split: str):
        import h5py
        self.blocks = pretrain_blocks(path, split)  # validated: one N, float32 or float16
        self.points = self.blocks[0].points
        self.starts = np.cumsum([0] + [b.count for b in self.blocks])
        self.source = [{"file": str(b.path), "group": b.group, "first": int(s), "count": b.count}
                       for b, s in zip(self.blocks, self.starts)]
        self.is_test = np.concatenate([np.full(b.count, b.group == "test") for b in self.blocks])
        labels, names = [], []
        for b in self.blocks:
            with h5py.File(b.path, "r") as f:
                labels.append(f[f"{b.group}/labels"][()] if f"{b.group}/labels" in f else None)
                names.append([n.decode() if isinstance(n, bytes) else str(n)
                              for n in f[f"{b.group}/names"][()]]
                             if f"{b.group}/names" in f else None)
                if "classes" in f.attrs and self.classes is None:
                    self.classes = [c.decode() if isinstance(c, bytes) else str(c)
                                    for c in f.attrs["classes"]]
        if all(x is not None for x in labels):  # a classification file
            self.labels = np.concatenate(labels).astype(np.int64)
        if all(x is not None for x in names):
            self.names = [n for ns in names for n in ns]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        import h5py
        out = np.empty((stop - start, self.points, 3), np.float32)  # (b, N, 3)
        for b, s in zip(self.blocks, self.starts):
            lo, hi = max(start, s), min(stop, s + b.count)
            if lo < hi:
                with h5py.File(b.path, "r") as f:
                    out[lo - start:hi - start] = f[f"{b.group}/points"][lo - s:hi - s]
        return out

    def where(self, i: int) -> str:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f"{self.blocks[k].path} '{self.blocks[k].group}/points' sample {i - self.starts[k]}"


class NpyClouds(Clouds):
    """An .npy of clouds (S, N, 3) or of one cloud (N, 3), memory-mapped."""
    kind = ".npy"

    def __init__(self, path: Path):
        self.path = path
        with reading(path, "an .npy of clouds (S, N, 3) or one cloud (N, 3)"):
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        if (array.ndim not in (2, 3) or array.shape[-1] != 3 or 0 in array.shape
                or not np.issubdtype(array.dtype, np.number)):
            raise BadInput(f"{path}: expected clouds (S, N, 3) or one cloud (N, 3) of numbers; "
                           f"found {array.shape} {array.dtype}")
        self.array = array[None] if array.ndim == 2 else array
        self.points = self.array.shape[1]
        self.source = {"shape": list(array.shape)}

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop], dtype=np.float32)  # a copy: read now

    def where(self, i: int) -> str:
        return f"{self.path} cloud {i}"


class FolderClouds(Clouds):
    """A folder tree of point-cloud files (the extensions `data_prep.folder` reads; others
    are ignored), sorted by path, one cloud per file, rows with a non-finite coordinate
    dropped. A file that cannot be read, or has fewer than `min_points` finite points, is an
    error naming it (`data_prep.folder` skips such files and lists them)."""
    kind = "folder"

    def __init__(self, root: Path, min_points: int):
        from pqae.readers import EXTRA, TEXT
        known = {".npy", ".npz", *TEXT, *EXTRA}
        files = sorted(p for p in root.rglob("*") if p.is_file())
        self.files = [p for p in files if p.suffix.lower() in known]
        self.ignored = len(files) - len(self.files)
        if not self.files:
            raise BadInput(f"{root} holds no point-cloud files ({', '.join(sorted(known))})")
        self.root, self.min_points, self.dropped = root, min_points, 0
        self.names = [p.relative_to(root).as_posix() for p in self.files]
        listing = hashlib.sha256("\n".join(self.names).encode()).hexdigest()
        self.source = {"files": len(self.names), "names_sha256": listing}

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(cloud (N_i, 3) float32, its rows in the file (N_i,))]: the finite rows."""
        from pqae.readers import Skip, read_cloud
        clouds = []
        for path in self.files[start:stop]:
            try:
                cloud = read_cloud(path)
            except Skip as why:
                raise BadInput(f"{path}: {why}") from None
            finite = np.isfinite(cloud).all(axis=1)
            self.dropped += int((~finite).sum())
            if finite.sum() < self.min_points:
                raise BadInput(f"{path}: {int(finite.sum())} finite points, fewer than the "
                               f"{self.min_points} this encoder groups")
            clouds.append((cloud[finite].astype(np.float32), np.flatnonzero(finite)))
        return clouds

    def where(self, i: int) -> str:
        return str(self.files[i])


def open_clouds(data: str, split: str, min_points: int) -> Clouds:
    """--data as Clouds: a directory with .h5 files in it is a set of shards, any other
    directory a folder of point-cloud files."""
    path = Path(data)
    if path.is_dir():
        if any(p.suffix in (".h5", ".hdf5") for p in path.iterdir()):
            return HDF5Clouds(path, split)
        return FolderClouds(path, min_points)
    if not path.exists():
        raise MissingFile(f"--data {path} does not exist")
    if path.suffix == ".npy":
        return NpyClouds(path)
    if path.suffix in (".h5", ".hdf5"):
        return HDF5Clouds(path, split)
    raise BadInput(f"--data {path}: expected an .h5 file, a directory of .h5 shards, an .npy or "
                   f"a folder of point-cloud files (give the folder that holds this file)")


def embed_chunk(embedder: PointEmbedder, chunk, level: str, n_out: int,
                where) -> dict[str, np.ndarray]:
    """A chunk of raw clouds (`Clouds.read`) -> the level's rows as NumPy arrays (the keys of
    `embed_batch`; the point level padded to `n_out` points, with `count` valid ones).
    `where(k)` names cloud k of the chunk."""
    device = embedder.device
    if isinstance(chunk, np.ndarray):  # clouds of one size: one batch
        x = torch.from_numpy(chunk).to(device)
        bad = first_non_finite(x)
        if bad is not None:
            raise BadInput(f"{where(bad)} has NaN or inf coordinates; drop those points (or "
                           f"that cloud) first")
        rows = {k: v.cpu().numpy() for k, v in embedder.embed_batch(x, level).items()}
        if level == "point":
            rows["count"] = np.full(len(x), rows["points"].shape[1], np.int32)
        return rows
    # A folder: clouds of any size. Each is FPS-sampled on its own (as `sample` would in a
    # batch), then the clouds of equal size are embedded together.
    used = [embedder.sample(torch.from_numpy(c).to(device)[None]) for c, _ in chunk]
    rows = [None] * len(chunk)
    for n in sorted({u.shape[1] for u, _ in used}):
        members = [k for k, (u, _) in enumerate(used) if u.shape[1] == n]
        out = embedder.embed_batch(torch.cat([used[k][0] for k in members]), level)
        for j, k in enumerate(members):
            rows[k] = {name: v[j].cpu().numpy() for name, v in out.items()}
            if level == "point":  # rows in the file, not in its FPS subset of finite rows
                rows[k]["index"] = chunk[k][1][used[k][1][0].cpu().numpy()]
    if level == "point":
        for row in rows:
            n = len(row["points"])
            row["count"] = np.int32(n)
            if n < n_out:  # padding: zero features, NaN points, index -1
                row["features"] = np.pad(row["features"], ((0, n_out - n), (0, 0)))
                row["points"] = np.pad(row["points"], ((0, n_out - n), (0, 0)),
                                       constant_values=np.nan)
                row["index"] = np.pad(row["index"], (0, n_out - n), constant_values=-1)
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def output_shapes(embedder: PointEmbedder, level: str, n_out: int, dtype: str) -> dict:
    """name -> (shape per cloud, stored dtype) of the datasets written chunk by chunk."""
    C, G = embedder.encoder.dim, embedder.num_group
    if level == "global":
        return {"features": ((2 * C,), dtype)}
    if level == "patch":
        return {"features": ((G, C), dtype), "centers": ((G, 3), "float32")}
    return {"features": ((n_out, C), dtype), "points": ((n_out, 3), "float32"),
            "index": ((n_out,), "int32"), "count": ((), "int32")}


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (names and bytes): which encoder wrote an output."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def create_output(path: Path, identity: dict, shapes: dict, clouds: Clouds) -> None:
    """The empty output with everything known before embedding (the input's labels, names,
    splits). The chunked datasets get their whole file space now (contiguous, early
    allocation, no fill): writing their rows later changes no metadata, so a run killed
    mid-chunk leaves the file as it was at its last flush."""
    import h5py
    S = len(clouds)
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in shapes.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            f.create_dataset(name, (S, *shape), dtype, dcpl=dcpl)
        if clouds.labels is not None:
            f["labels"] = clouds.labels
        if clouds.names is not None:
            f.create_dataset("names", data=np.array(clouds.names, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        if clouds.is_test is not None:
            f["is_test"] = clouds.is_test
        if clouds.classes is not None:
            f.attrs["classes"] = clouds.classes
        for k, v in identity.items():
            f.attrs[k] = v
        f.attrs["done"] = 0


def resume_point(path: Path, identity: dict, resume: bool) -> int:
    """The clouds an unfinished output already holds, after checking it was started with the
    same settings (else BadInput naming the differences)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            done, found = int(f.attrs["done"]), {k: f.attrs.get(k) for k in identity}
    except (OSError, KeyError) as e:
        raise BadInput(f"{path} (an unfinished output) cannot be read ({e}); start again with "
                       f"--overwrite") from None
    if not resume:
        raise BadInput(f"{path} holds an unfinished run ({done}/{identity['clouds']} clouds): "
                       f"continue it with --resume, or start again with --overwrite")
    differ = [f"{k} {found[k]!r} (now {v!r})" for k, v in identity.items()
              if not (found[k] == v if not isinstance(v, str) else str(found[k]) == v)]
    if differ:
        raise BadInput(f"{path} was started with other settings: " + "; ".join(differ)
                       + ". Continue it with those, or start again with --overwrite")
    return done


def write_chunk(f, start: int, rows: dict[str, np.ndarray]) -> int:
    """Write a chunk's rows at `start`, then advance `done` and flush: whenever the run is
    killed, the first `done` rows on disk are complete. Returns the new `done`."""
    stop = start + len(rows["features"])
    for name, value in rows.items():
        f[name][start:stop] = value.astype(f[name].dtype)
    f.attrs["done"] = stop
    f.flush()
    return stop


def main(cfg: Config) -> dict:
    import h5py
    for flag, value in (("--ckpt", cfg.ckpt), ("--data", cfg.data), ("--out", cfg.out)):
        if not value:
            raise BadInput(f"{flag} is required: python -m pqae.embed --ckpt CKPT (or random "
                           f"--like CKPT) --data FILE|DIR --out feats.h5")
    if cfg.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1; got {cfg.batch_size}")
    if cfg.resume and cfg.overwrite:
        raise BadInput("--resume continues an unfinished output and --overwrite deletes it: "
                       "give one of them")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but torch sees no GPU; use --device cpu (or auto)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    if out.exists() and not cfg.overwrite:
        if cfg.resume and not tmp.exists():
            print(f"{out} is already complete; nothing to do", flush=True)
            return {"out": str(out), "clouds": 0, "resumed_from": None}
        raise BadInput(f"{out} already exists; write to another --out, or replace it with "
                       f"--overwrite")

    embedder, what = encoder_for(cfg.ckpt, cfg.like, device, cfg.seed)
    clouds = open_clouds(cfg.data, cfg.split, max(embedder.num_group, embedder.group_size))
    S = len(clouds)
    if clouds.points is not None and clouds.points < max(embedder.num_group, embedder.group_size):
        raise BadInput(f"{cfg.data}: clouds of {clouds.points} points are fewer than the "
                       f"{embedder.num_group} patches of {embedder.group_size} points this "
                       f"encoder groups")
    if S == 0:
        raise BadInput(f"{cfg.data} holds no clouds" + (f" in split {cfg.split}"
                                                         if clouds.kind == "HDF5" else ""))
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32" if cfg.level == "global" else "float16"
    n_out = min(clouds.points or embedder.num_points, embedder.num_points)
    shapes = output_shapes(embedder, cfg.level, n_out, dtype)
    encoder = {"ckpt": cfg.ckpt, "like": cfg.like, "seed": cfg.seed,
               "num_points": embedder.num_points, "num_group": embedder.num_group,
               "group_size": embedder.group_size, "dim": embedder.encoder.dim,
               "weights_sha256": weights_sha256(embedder)}
    identity = {"format_version": FORMAT_VERSION, "level": cfg.level, "dtype": dtype,
                "data": str(Path(cfg.data).resolve()), "split": cfg.split, "clouds": S,
                "encoder": json.dumps(encoder), "source": json.dumps(clouds.source)}

    if cfg.overwrite:
        out.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    start = resume_point(tmp, identity, cfg.resume) if tmp.exists() else 0
    if not tmp.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        create_output(tmp, identity, shapes, clouds)
    print(f"embedding {S} clouds of {cfg.data} ({clouds.kind}"
          f"{f', split {cfg.split}' if clouds.kind == 'HDF5' else ''}) with {what} on {device}: "
          f"level {cfg.level}, features {(S, *shapes['features'][0])} {dtype}"
          + (f"; resuming at {start}/{S}" if start else ""), flush=True)

    try:
        f = h5py.File(tmp, "r+")
    except OSError as e:
        raise BadInput(f"cannot open {tmp} for writing ({e}); is another pqae.embed writing "
                       f"it?") from None
    t0 = last = time.perf_counter()
    done = start
    try:
        with f, ThreadPoolExecutor(1) as reader:
            # The next chunk is read from disk while this one is embedded.
            pending = reader.submit(clouds.read, start, min(start + cfg.batch_size, S))
            for a in range(start, S, cfg.batch_size):
                b = min(a + cfg.batch_size, S)
                chunk = pending.result()
                if b < S:
                    pending = reader.submit(clouds.read, b, min(b + cfg.batch_size, S))
                rows = embed_chunk(embedder, chunk, cfg.level, n_out,
                                   lambda k, a=a: clouds.where(a + k))
                done = write_chunk(f, a, rows)
                now = time.perf_counter()
                if a == start or b == S or now - last >= cfg.log_every:
                    rate = (b - start) / max(now - t0, 1e-9)
                    print(f"embed {b}/{S} clouds | {rate:.1f} clouds/s | "
                          f"ETA {format_eta((S - b) / rate)}", flush=True)
                    last = now
    except BaseException:
        if done == 0:  # nothing to resume: leave no file behind
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0

    stored = {name: ((S, *shape), dt) for name, (shape, dt) in shapes.items() if name != "count"}
    summary = (f"{S} clouds, level {cfg.level}: "
               + ", ".join(f"{name} {shape} {dt}" for name, (shape, dt) in stored.items())
               + f" | {seconds:.1f} s ({(S - start) / max(seconds, 1e-9):.1f} clouds/s)")
    if isinstance(clouds, FolderClouds):
        summary += (f" | non-finite points dropped: {clouds.dropped}, files of other kinds "
                    f"ignored: {clouds.ignored}")
    extra = [k for k, v in (("labels", clouds.labels), ("names", clouds.names),
                            ("is_test", clouds.is_test)) if v is not None]
    look = f"import h5py; f = h5py.File('{out}'); print({{k: f[k].shape for k in f}})"
    finish(summary, {"embeddings": f"{out}" + (f" (with {', '.join(extra)})" if extra else "")},
           [f'python -c "{look}"'])
    return {"out": str(out), "clouds": S, "level": cfg.level, "resumed_from": start,
            "shapes": {name: list(shape) for name, (shape, _) in stored.items()},
            "dtype": dtype, "seconds": seconds}


if __name__ == "__main__":
    from pqae.cli import run
    run(main, Config, {"default": Config()}, doc=__doc__.split("\n\n")[0],
        prog="python -m pqae.embed")
