"""Convert the official ShapeNet-55 release into one HDF5 file for `pqae.data.load_shapenet55`.

    python -m data_prep.shapenet55 --root data/ShapeNet55-34 --out data/shapenet55.h5
    python -m data_prep.shapenet55 --root data/ShapeNet55-34 --out /tmp/s55.h5 --limit 100

Input: `<root>/shapenet_pc/<synset>-<model_id>.npy`, each 8192 x 3, listed one file
name per line in `<root>/ShapeNet-55/train.txt` (41,952) and `test.txt` (10,518).

Output: groups `train` and `test`, each with `points` (S, 8192, 3) float32 (one chunk per
sample), `names` (S,) utf-8 file names and `taxonomy` (S,) synset ids; root attributes
`format_version`, `source_root`, `num_train`, `num_test`, `num_points`.

Every cloud is validated (readable, shape exactly (8192, 3), finite). All problems are
collected and reported by file name; if there is any, nothing is written (the file is built
under a temporary name and renamed only on success) and the command exits non-zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from data_prep.common import ConversionError, run
from pqae.data import SHAPENET55_FORMAT_VERSION, SHAPENET55_POINTS
from pqae.log import atomic_output

SPLITS = ("train", "test")
BLOCK = 512  # clouds buffered per HDF5 write: 48 MB, fast writes without holding the set


@dataclass(frozen=True)
class Config:
    root: Path
    """The official `ShapeNet55-34` directory (holds `shapenet_pc/` and `ShapeNet-55/`)."""
    out: Path
    """Output HDF5 file."""
    limit: int | None = None
    """Convert only the first `limit` lines of each split list (quick runs and tests)."""
    progress_every: int = 5000
    """Print a progress line every this many files."""



def read_split_list(root: Path, split: str, limit: int | None) -> list[str]:
    path = root / "ShapeNet-55" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path} (is --root the ShapeNet55-34 dir?)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return names if limit is None else names[:limit]


def load_cloud(path: Path) -> tuple[np.ndarray | None, str | None]:
    """Return (cloud (8192, 3) float32, None) or (None, reason it is unusable)."""
    if not path.is_file():
        return None, "missing file"
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # any unreadable file is reported, not fatal
        return None, f"unreadable ({type(e).__name__}: {e})"
    if arr.shape != (SHAPENET55_POINTS, 3):
        return None, f"shape {arr.shape}, expected ({SHAPENET55_POINTS}, 3)"
    if not np.issubdtype(arr.dtype, np.number):
        return None, f"non-numeric dtype {arr.dtype}"
    arr = arr.astype(np.float32)  # the reference casts to float32 on load
    if not np.isfinite(arr).all():  # checked after the cast, which may overflow to inf
        return None, "contains NaN or inf values"
    return arr, None


def write_split(f: h5py.File, cfg: Config, split: str, names: list[str], problems: list[str],
                done: int, total: int, t0: float) -> int:
    """Validate and write one split's clouds block by block; returns the running file count."""
    s = len(names)
    grp = f.create_group(split)
    pts = grp.create_dataset(
        "points", shape=(s, SHAPENET55_POINTS, 3), dtype=np.float32,
        chunks=(1, SHAPENET55_POINTS, 3) if s else None,  # one sample per chunk
    )
    text = h5py.string_dtype("utf-8")
    grp.create_dataset("names", data=np.array(names, dtype=object), dtype=text)
    grp.create_dataset("taxonomy", data=np.array([n.split("-")[0] for n in names], dtype=object),
                       dtype=text)
    buf = np.zeros((BLOCK, SHAPENET55_POINTS, 3), dtype=np.float32)  # (BLOCK, 8192, 3)
    for start in range(0, s, BLOCK):
        stop = min(start + BLOCK, s)
        for i in range(start, stop):
            cloud, problem = load_cloud(cfg.root / "shapenet_pc" / names[i])
            if problem is not None:
                problems.append(f"{split}: {names[i]}: {problem}")
            else:
                buf[i - start] = cloud
            done += 1
            if done % cfg.progress_every == 0:
                print(f"{done}/{total} files | {len(problems)} problems | "
                      f"{time.time() - t0:.0f} s", flush=True)
        if not problems:  # once anything is wrong the output is discarded; stop writing it
            pts[start:stop] = buf[: stop - start]
    return done


def main(cfg: Config) -> Path:
    """Convert; return the output path. Raises ConversionError listing every bad file."""
    lists = {split: read_split_list(cfg.root, split, cfg.limit) for split in SPLITS}
    total = sum(len(v) for v in lists.values())
    print(f"converting {total} clouds ({', '.join(f'{k} {len(v)}' for k, v in lists.items())}) "
          f"from {cfg.root}", flush=True)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    t0 = time.time()
    with atomic_output(cfg.out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = SHAPENET55_FORMAT_VERSION
            f.attrs["source_root"] = str(cfg.root.resolve())
            f.attrs["num_points"] = SHAPENET55_POINTS
            done = 0
            for split in SPLITS:
                f.attrs[f"num_{split}"] = len(lists[split])
                done = write_split(f, cfg, split, lists[split], problems, done, total, t0)
        if problems:
            raise ConversionError(
                f"{len(problems)} problem(s) in {cfg.root}; no output written:\n  "
                + "\n  ".join(problems)
            )
    print(f"wrote {cfg.out} ({total} clouds, {time.time() - t0:.0f} s)", flush=True)
    return cfg.out


if __name__ == "__main__":
    run(Config, main)
