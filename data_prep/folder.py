"""Your own point clouds: a folder tree of files -> the HDF5 files the scripts read as they are.

    python -m data_prep.folder --root my_scans --out data/my_scans.h5
    python pretrain.py --data-path data/my_scans.h5          # unlabelled: the pretraining format
    python -m data_prep.folder --root my_objects --out data/my_objects.h5 --labels folders
    python finetune_cls.py --data modelnet40 --data-path data/my_objects.h5 --num-classes K

Unlabelled (the default): every cloud under --root, in the pretraining format of
`data_prep.shapenet55` (`train/points` (S, P, 3) float32, an empty `test`), which
`pretrain.py --data-path` reads. Labelled (`--labels folders`): one class per first-level
folder, in the classification format (`train` and `test`, each with `points` (S, P, 3)
float32 and `labels` (S,) int64; class names in the attribute `classes`), split at a fixed
seed by `--test-fraction`. P is `--points` (8192, ShapeNet-55's count, by default).

Formats read without extras: `.npy`, `.npz` (the array `points`, `xyz` or the only one),
`.txt` / `.xyz` / `.pts` / `.csv` (whitespace or commas; the first three columns are x y z;
a header line is skipped). With `pip install -e ".[io]"`: `.ply` (ASCII and binary, plyfile),
`.pcd` (ASCII, binary, binary_compressed; pypcd4), `.las` (laspy; `.laz` also needs a LAZ
backend such as lazrs), and meshes `.obj` / `.off` / `.stl` / `.glb` (trimesh), sampled on
their surface, area-weighted, at --points points. Without its reader such a file is skipped
with the command that installs it. Other extensions are skipped as unknown.

Every cloud: rows with a non-finite coordinate are dropped (counted); fewer than
`--min-points` left: skipped; then resampled to --points, by farthest point sampling
(`--sample fps`, the FPS kernel on the GPU when there is one) or uniformly at random
(`--sample random`, with replacement when the cloud is smaller). A file that cannot be used
is skipped and listed with its reason in `<out>.skipped.txt` and the summary; `--strict`
makes any skip fatal. The output is written under a temporary name and renamed when complete:
nothing partial is ever left.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from data_prep.common import ConversionError, run
from pqae.data import CLS_FORMAT_VERSION, MAX_COORD, SHAPENET55_FORMAT_VERSION
from pqae.log import atomic_output

TEXT = (".txt", ".xyz", ".pts", ".csv")
MESHES = (".obj", ".off", ".stl", ".glb")
EXTRA = {".ply": "plyfile", ".pcd": "pypcd4", ".las": "laspy", ".laz": "laspy",
         **{ext: "trimesh" for ext in MESHES}}  # extension -> its reader ([io] extra)


@dataclass(frozen=True)
class Config:
    root: Path
    """the folder to convert; every file under it is read (sorted by path)."""
    out: Path
    """the HDF5 file to write."""
    labels: Literal["none", "folders"] = "none"
    """none: unlabelled, the pretraining format. folders: one class per first-level folder,
    the classification format."""
    points: int = 8192
    """points per cloud in the output. Pretraining reads any count (at least its
    --num-points); the classification loaders expect 8192 (--data modelnet40) or 2048
    (--data scanobjectnn)."""
    dtype: Literal["float32", "float16"] = "float32"
    """the stored coordinates' type; float16 halves the file of an unlabelled set
    (pretraining widens it on load). The classification format is float32."""
    sample: Literal["fps", "random"] = "fps"
    """how a cloud is brought to --points: farthest point sampling, or uniform at random."""
    min_points: int = 64
    """a cloud with fewer finite points than this is skipped."""
    test_fraction: float = 0.2
    """--labels folders: the share of each class put in `test` (at least one when the class
    has two clouds or more), drawn at --seed."""
    seed: int = 0
    strict: bool = False
    """stop at the first file that cannot be used instead of skipping it."""


class Skip(Exception):
    """A file that cannot be used; the message is the reason."""


def read_cloud(path: Path, mesh_points: int = 8192, seed: int = 0) -> np.ndarray:
    """(N, 3) float64 coordinates of one file, or Skip with the reason. A mesh gives
    `mesh_points` points sampled on its surface, area-weighted, at `seed`."""
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = [k for k in ("points", "xyz") if k in f.files] or f.files
                if len(keys) != 1 and not {"points", "xyz"} & set(f.files):
                    raise Skip(f"an .npz with arrays {f.files}: name one `points` or `xyz`")
                arr = f[keys[0]]
        elif ext in TEXT:
            arr = _read_text(path)
        elif ext in EXTRA:
            arr = _read_extra(path, ext, mesh_points, seed)
        else:
            raise Skip(f"unknown extension {ext or '(none)'}")
    except Skip:
        raise
    except Exception as e:  # a damaged file of a known kind
        raise Skip(f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
        raise Skip(f"not a point array (found shape {arr.shape}, dtype {arr.dtype}; expected "
                   f"(N, >=3) numbers, the first three columns x y z)")
    return arr[:, :3].astype(np.float64)


def _read_text(path: Path) -> np.ndarray:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            try:
                rows.append([float(v) for v in parts[:3]] if len(parts) >= 3 else None)
            except ValueError:
                if i == 0:
                    continue  # a header line
                raise Skip(f"line {i + 1} is not numbers: {line.strip()[:80]!r}") from None
            if rows[-1] is None:
                raise Skip(f"line {i + 1} has fewer than 3 values")
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _read_extra(path: Path, ext: str, mesh_points: int, seed: int) -> np.ndarray:
    """The formats read by a well-kept library of the [io] extra."""
    package = EXTRA[ext]
    try:
        module = __import__(package)
    except ImportError:
        raise Skip(f'a {ext} file needs the {package} package: pip install -e ".[io]"') from None
    if ext == ".ply":
        vertex = module.PlyData.read(str(path))["vertex"]
        return np.stack([np.asarray(vertex[c], dtype=np.float64) for c in ("x", "y", "z")], 1)
    if ext == ".pcd":  # ASCII, binary and binary_compressed
        return module.PointCloud.from_path(path).numpy(("x", "y", "z"))
    if ext in (".las", ".laz"):  # scaled and offset coordinates; .laz needs a LAZ backend
        las = module.read(str(path))
        return np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], 1)
    mesh = module.load(str(path), force="mesh")
    if len(getattr(mesh, "faces", ())) == 0:
        raise Skip("a mesh without faces")
    points, _ = module.sample.sample_surface(mesh, mesh_points, seed=seed)  # area-weighted
    return np.asarray(points)


def resample(cloud: np.ndarray, points: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) -> (points, 3) float32. fps: farthest point sampling from a random start (the
    kernels' FPS); a cloud of `points` or fewer keeps every point once, then random
    duplicates. random: uniform, with replacement only when the cloud is smaller."""
    n = len(cloud)
    if n <= points:
        idx = np.concatenate([rng.permutation(n), rng.choice(n, points - n)])
        return cloud[idx].astype(np.float32)
    if how == "random":
        return cloud[rng.choice(n, points, replace=False)].astype(np.float32)
    from kernels import fps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(cloud[rng.permutation(n)].astype(np.float32)).to(device)
    return x[fps(x[None], points)[0]].cpu().numpy()


def collect(cfg: Config) -> list[tuple[Path, str | None]]:
    """(file, class name or None) for every file under --root, sorted."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if cfg.labels == "none":
        return [(p, None) for p in files]
    out = []
    for p in files:
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            raise ConversionError(f"{p}: with --labels folders every file must sit in a class "
                                  f"folder (ROOT/CLASS/...); this one is directly under --root")
        out.append((p, rel.parts[0]))
    return out


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    if cfg.labels != "none" and cfg.dtype != "float32":
        raise ConversionError("--dtype float16 is for unlabelled sets: the classification "
                              "loaders read float32")
    items = collect(cfg)
    if not items:
        raise ConversionError(f"--root {cfg.root} holds no files")
    rng = np.random.default_rng(cfg.seed)
    clouds, classes, skipped, dropped = [], [], [], 0
    for path, label in items:
        try:
            cloud = read_cloud(path, cfg.points, cfg.seed)
            finite = np.isfinite(cloud).all(1)
            dropped += int((~finite).sum())
            cloud = cloud[finite]
            if len(cloud) < cfg.min_points:
                raise Skip(f"{len(cloud)} finite points, fewer than --min-points {cfg.min_points}")
            if np.abs(cloud).max() > MAX_COORD or (cloud.max(0) == cloud.min(0)).all():
                raise Skip(f"zero extent or coordinates beyond +-{MAX_COORD:g}: it cannot be "
                           f"normalised")
        except Skip as why:
            if cfg.strict:
                raise ConversionError(f"{path}: {why} (--strict)") from None
            skipped.append((path, str(why)))
            continue
        clouds.append(resample(cloud, cfg.points, cfg.sample, rng))
        classes.append(label)
    if not clouds:
        raise ConversionError(f"no usable cloud under {cfg.root}: "
                              + "; ".join(f"{p.name}: {w}" for p, w in skipped[:5]))
    points = np.stack(clouds)  # (S, P, 3) float32
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        if cfg.labels == "none":
            f["train/points"] = points.astype(cfg.dtype)
            f["test/points"] = np.zeros((0, cfg.points, 3), cfg.dtype)
            f.attrs["format_version"] = SHAPENET55_FORMAT_VERSION
            split = {"train": len(points)}
        else:
            names = sorted(set(classes))
            labels = np.array([names.index(c) for c in classes], np.int64)
            test = np.zeros(len(labels), bool)
            for k in range(len(names)):
                members = np.flatnonzero(labels == k)
                n_test = int(round(cfg.test_fraction * len(members)))
                n_test = max(n_test, 1) if len(members) > 1 and cfg.test_fraction > 0 else n_test
                test[rng.permutation(members)[:n_test]] = True
            for name, mask in (("train", ~test), ("test", test)):
                f[f"{name}/points"] = points[mask]
                f[f"{name}/labels"] = labels[mask]
            f.attrs["format_version"] = CLS_FORMAT_VERSION
            f.attrs["classes"] = names
            split = {"train": int((~test).sum()), "test": int(test.sum()), "classes": len(names)}
        f.attrs["source_root"] = str(cfg.root)
        f.attrs["num_points"] = cfg.points
    listing = out.with_name(out.name + ".skipped.txt")
    if skipped:
        listing.write_text("".join(f"{p}\t{w}\n" for p, w in skipped))
    else:
        listing.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    reasons = Counter(w.split(" (")[0] for _, w in skipped)
    summary = {"files": len(items), "clouds": len(clouds), "points_dropped": dropped,
               "skipped": len(skipped), "skipped_by_reason": dict(reasons), **split,
               "seconds": round(seconds, 2), "out": str(out)}
    print(f"{len(items)} files read, {len(clouds)} clouds written to {out} "
          f"({', '.join(f'{k} {v}' for k, v in split.items())}), {dropped} non-finite points "
          f"dropped, {len(skipped)} skipped{f' (listed in {listing})' if skipped else ''}, "
          f"{seconds:.1f} s ({len(items) / max(seconds, 1e-9):.0f} files/s)")
    for reason, n in reasons.most_common():
        print(f"  skipped {n}: {reason}")
    return summary


if __name__ == "__main__":
    run(Config, main)
