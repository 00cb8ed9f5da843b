"""Convert one ScanObjectNN variant (the released h5 files) into the HDF5 of `load_scanobjectnn`.

    python -m data_prep.scanobjectnn --root data/ScanObjectNN --variant objbg   --out data/scanobjectnn_objbg.h5
    python -m data_prep.scanobjectnn --root data/ScanObjectNN --variant objonly --out data/scanobjectnn_objonly.h5
    python -m data_prep.scanobjectnn --root data/ScanObjectNN --variant hardest --out data/scanobjectnn_hardest.h5

Input, under --root:
    objbg    main_split/{training,test}_objectdataset.h5
    objonly  main_split_nobg/{training,test}_objectdataset.h5
    hardest  main_split/{training,test}_objectdataset_augmentedrot_scale75.h5  (PB_T50_RS)
each with `data` (S, 2048, 3) and `label` (S,) (other keys such as `mask` are ignored).

Output: groups `train` and `test`, each with `points` (S, 2048, 3) float32 as stored (the
reference does not normalise ScanObjectNN) and `labels` (S,) int64; root attributes
`format_version`, `variant`, `num_classes`. Every file is validated (keys, shapes, labels in
0..14, finite coordinates); an error names the file, the expected layout and what was found.
The output is written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from data_prep.common import run
from pqae.data import CLS_FORMAT_VERSION, SCANOBJECTNN_CLASSES, SCANOBJECTNN_POINTS
from pqae.log import atomic_output

FILES = {  # variant -> (sub-directory, file-name suffix)
    "objbg": ("main_split", ""),
    "objonly": ("main_split_nobg", ""),
    "hardest": ("main_split", "_augmentedrot_scale75"),
}
EXPECTED = (f"`data` (S, {SCANOBJECTNN_POINTS}, 3) numeric and `label` (S,) integers in "
            f"0..{SCANOBJECTNN_CLASSES - 1}")


@dataclass(frozen=True)
class Config:
    root: Path
    """The ScanObjectNN directory holding `main_split/` and `main_split_nobg/`."""
    variant: Literal["objbg", "objonly", "hardest"]
    """objbg = OBJ_BG, objonly = OBJ_ONLY, hardest = PB_T50_RS."""
    out: Path
    """Output HDF5 file."""


def source_files(root: Path, variant: str) -> dict[str, Path]:
    sub, suffix = FILES[variant]
    return {split: root / sub / f"{name}_objectdataset{suffix}.h5"
            for split, name in (("train", "training"), ("test", "test"))}


def read_release_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(points (S, 2048, 3) float32, labels (S,) int64) of a released file, validated."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a released ScanObjectNN file with "
                                f"{EXPECTED})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}); expected {EXPECTED}") from e
    with f:
        missing = [k for k in ("data", "label") if k not in f]
        if missing:
            raise ValueError(f"{path}: expected {EXPECTED}; missing {missing}, found keys "
                             f"{sorted(f.keys())}")
        points, labels = f["data"][()], f["label"][()]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # some copies store labels as (S, 1)
    if (points.ndim != 3 or points.shape[1:] != (SCANOBJECTNN_POINTS, 3)
            or not np.issubdtype(points.dtype, np.number) or labels.shape != (points.shape[0],)
            or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: expected {EXPECTED}; found `data` {points.shape} {points.dtype}"
                         f" and `label` {labels.shape} {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= SCANOBJECTNN_CLASSES))
    if bad.size:
        raise ValueError(f"{path}: expected {EXPECTED}; found {bad.size} label(s) out of range, "
                         f"first at sample {bad[0]} (= {labels[bad[0]]})")
    points = points.astype(np.float32)  # the reference reads float32
    finite = np.isfinite(points).reshape(len(points), -1).all(axis=1)
    if not finite.all():
        raise ValueError(f"{path}: sample {np.flatnonzero(~finite)[0]} contains NaN or inf "
                         f"({(~finite).sum()} sample(s) in all)")
    return points, labels.astype(np.int64)


def main(cfg: Config) -> Path:
    splits = {split: read_release_file(p) for split, p in source_files(cfg.root, cfg.variant).items()}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cfg.out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = CLS_FORMAT_VERSION
            f.attrs["variant"] = cfg.variant
            f.attrs["num_classes"] = SCANOBJECTNN_CLASSES
            for split, (points, labels) in splits.items():
                f.create_dataset(f"{split}/points", data=points)
                f.create_dataset(f"{split}/labels", data=labels)
    print(f"wrote {cfg.out} ({cfg.variant}: train {len(splits['train'][1])}, "
          f"test {len(splits['test'][1])})")
    return cfg.out


if __name__ == "__main__":
    run(Config, main)
