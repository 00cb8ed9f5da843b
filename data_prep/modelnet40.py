"""Convert ModelNet40 (either released form) into the HDF5 of `pqae.data.load_modelnet40`.

    python -m data_prep.modelnet40 --root data/ModelNet/modelnet40_normal_resampled --out data/modelnet40.h5
    python -m data_prep.modelnet40 --root ... --source dat --out data/modelnet40.h5   # Point-BERT caches

Input, under --root: `modelnet40_shape_names.txt` (40 names; class id = line index),
`modelnet40_{train,test}.txt` (shape ids such as `airplane_0001`; or --train-list/--test-list),
and either
* source txt: `<class>/<shape_id>.txt`, comma-separated, 6 columns (xyz, normal), 10,000 rows.
  Each cloud is subsampled to 8192 points by FPS (`kernels.fps`, deterministic: it starts at
  row 0). This DIFFERS from the reference's cache, which used a CPU FPS with a random start;
  the sets are alike in spread but not identical.
* source dat: `modelnet40_{train,test}_8192pts_fps.dat`, the reference's pickled caches
  ([list of (8192, 6) float32 arrays, list of (1,) int32 labels], in list order). The file
  must start with the pickle protocol byte 0x80, and it is read by a restricted Unpickler that
  can only rebuild NumPy arrays and dtypes: any other global in the pickle is refused, so
  loading it cannot run code.

Checked against the split lists: counts (9,843 / 2,468 for the official lists), missing files,
unknown classes, rows/columns, finiteness, and (dat) that each label matches the class of the
shape id at that position. Every problem is reported by name; nothing is written if any.

Output: groups `train` and `test`, each with `points` (S, 8192, 3) float32 raw xyz (normals
dropped; the loader normalises to the unit sphere), `labels` (S,) int64, `names` (S,) shape
ids; root attributes `format_version`, `source`, `classes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from data_prep.common import ConversionError, read_numpy_pickle, run
from pqae.data import CLS_FORMAT_VERSION, MODELNET40_POINTS, fps_gather
from pqae.log import atomic_output

SPLITS = ("train", "test")
OFFICIAL_COUNTS = {"train": 9843, "test": 2468}
MAX_LISTED = 20  # problems listed per kind; the rest are counted


@dataclass(frozen=True)
class Config:
    root: Path
    """The `modelnet40_normal_resampled` directory."""
    out: Path
    """Output HDF5 file."""
    source: Literal["txt", "dat"] = "txt"
    """txt: the per-shape text files (FPS to 8192 here); dat: the reference's pickled caches."""
    train_list: Path | None = None
    """train shape ids (default: <root>/modelnet40_train.txt)."""
    test_list: Path | None = None
    """test shape ids (default: <root>/modelnet40_test.txt)."""
    check_counts: bool = True
    """require the official list sizes (9,843 train / 2,468 test); off for partial copies."""
    fps_batch: int = 32
    """clouds per FPS call (source txt)."""



def _listing(kind: str, items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{kind} ({len(items)}): {', '.join(items[:MAX_LISTED])}{more}"


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def class_of(shape_id: str) -> str:
    return shape_id.rsplit("_", 1)[0]  # `night_stand_0001` -> `night_stand`


def read_text_cloud(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(xyz (R, 3) float32, None) or (None, why it is unusable)."""
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except Exception as e:  # reported by name, not fatal
        return None, f"unreadable ({type(e).__name__}: {e})"
    if arr.shape[1] != 6 or arr.shape[0] < MODELNET40_POINTS:
        return None, f"shape {arr.shape}, expected ({'>='}{MODELNET40_POINTS}, 6)"
    if not np.isfinite(arr).all():
        return None, "contains NaN or inf values"
    return arr[:, :3], None


def read_dat(path: Path) -> tuple[list, list]:
    """The [points, labels] lists of a reference `.dat` cache, type-checked."""
    obj = read_numpy_pickle(path, "a reference ModelNet40 .dat cache")
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(x, list) for x in obj)
            and len(obj[0]) == len(obj[1])):
        raise ConversionError(f"{path}: expected [list of (8192, 6) arrays, list of labels] of "
                              f"equal length; found {type(obj).__name__}")
    return obj[0], obj[1]


def convert_split(cfg: Config, split: str, ids: list[str], classes: list[str],
                  problems: list[str], pending: list) -> tuple[np.ndarray, np.ndarray]:
    """(points (S, 8192, 3), labels (S,)) of one split; problems appended by name. Text clouds
    are appended to `pending` and filled in later by `fps_pending`."""
    index = {c: i for i, c in enumerate(classes)}
    if cfg.check_counts and len(ids) != OFFICIAL_COUNTS[split]:
        problems.append(f"{split}: the list has {len(ids)} shapes, the official list "
                        f"{OFFICIAL_COUNTS[split]} (a subset on purpose? add --no-check-counts)")
    unknown = [s for s in ids if class_of(s) not in index]
    if unknown:
        problems.append(f"{split}: " + _listing("unknown classes", unknown))
    labels = np.array([index.get(class_of(s), -1) for s in ids], dtype=np.int64)
    points = np.zeros((len(ids), MODELNET40_POINTS, 3), np.float32)
    if cfg.source == "dat":
        clouds, dat_labels = read_dat(cfg.root / f"modelnet40_{split}_8192pts_fps.dat")
        if len(clouds) != len(ids):
            problems.append(f"{split}: the cache holds {len(clouds)} shapes, the list {len(ids)}")
            return points, labels
        bad, wrong = [], []
        for i, (cloud, lab) in enumerate(zip(clouds, dat_labels)):
            ok = (isinstance(cloud, np.ndarray) and cloud.ndim == 2 and cloud.shape[0] == MODELNET40_POINTS
                  and cloud.shape[1] >= 3
                  and np.isfinite(cloud[:, :3].astype(np.float32)).all())  # as stored
            if not ok:
                bad.append(f"{ids[i]} ({getattr(cloud, 'shape', type(cloud).__name__)})")
                continue
            points[i] = cloud[:, :3]
            if int(np.asarray(lab).reshape(-1)[0]) != labels[i]:
                wrong.append(f"{ids[i]} (label {int(np.asarray(lab).reshape(-1)[0])})")
        if bad:
            problems.append(f"{split}: " + _listing("bad clouds", bad))
        if wrong:
            problems.append(f"{split}: " + _listing("labels not matching the list", wrong))
        return points, labels
    missing, bad, ok_rows = [], [], []
    for i, s in enumerate(ids):
        path = cfg.root / class_of(s) / f"{s}.txt"
        if not path.is_file():
            missing.append(f"{s} ({path.relative_to(cfg.root)})")
            continue
        xyz, why = read_text_cloud(path)
        if why:
            bad.append(f"{s}: {why}")
            continue
        ok_rows.append((i, xyz))
    if missing:
        problems.append(f"{split}: " + _listing("missing files", missing))
    if bad:
        problems.append(f"{split}: " + _listing("bad files", bad))
    pending.extend((points, i, xyz) for i, xyz in ok_rows)  # FPS'd for both splits at once
    return points, labels


def fps_pending(pending: list, batch: int) -> None:
    """FPS every pending text cloud to 8192 points, written into its split's array."""
    for start in range(0, len(pending), batch):
        chunk = pending[start:start + batch]
        rows = min(len(xyz) for _, _, xyz in chunk)  # 10,000 in the release
        xyz = torch.from_numpy(np.stack([x[:rows] for _, _, x in chunk]))  # (b, rows, 3)
        sub = fps_gather(xyz, MODELNET40_POINTS).numpy()  # (b, 8192, 3)
        for (points, i, _), cloud in zip(chunk, sub):
            points[i] = cloud


def main(cfg: Config) -> Path:
    classes = read_lines(cfg.root / "modelnet40_shape_names.txt")
    if len(classes) != 40:
        raise ConversionError(f"{cfg.root / 'modelnet40_shape_names.txt'}: {len(classes)} class "
                              f"names, expected 40")
    lists = {"train": cfg.train_list or cfg.root / "modelnet40_train.txt",
             "test": cfg.test_list or cfg.root / "modelnet40_test.txt"}
    problems: list[str] = []
    out, pending = {}, []
    for split in SPLITS:
        ids = read_lines(lists[split])
        print(f"{split}: {len(ids)} shapes from {lists[split]} ({cfg.source})", flush=True)
        out[split] = (ids, *convert_split(cfg, split, ids, classes, problems, pending))
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) in {cfg.root}; no output written:\n  "
                              + "\n  ".join(problems))
    fps_pending(pending, cfg.fps_batch)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cfg.out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = CLS_FORMAT_VERSION
            f.attrs["source"] = cfg.source
            f.attrs["classes"] = classes
            for split, (ids, points, labels) in out.items():
                f.create_dataset(f"{split}/points", data=points)
                f.create_dataset(f"{split}/labels", data=labels)
                f.create_dataset(f"{split}/names", data=np.array(ids, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
    print(f"wrote {cfg.out} (train {len(out['train'][0])}, test {len(out['test'][0])})")
    return cfg.out


if __name__ == "__main__":
    run(Config, main)
