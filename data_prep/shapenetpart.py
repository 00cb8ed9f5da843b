"""Convert the official ShapeNetPart release into one HDF5 file for `pqae.shapenetpart`.

    python -m data_prep.shapenetpart \
        --root data/shapenetcore_partanno_segmentation_benchmark_v0_normal --out data/shapenetpart.h5

Input: `<root>/synsetoffset2category.txt` (lines "Name<whitespace>synset"), one
folder per synset of `<model_id>.txt` files (7 space-separated columns x y z nx ny nz
part_label), and `<root>/train_test_split/shuffled_{train,val,test}_file_list.json` (JSON lists
of "shape_data/<synset>/<model_id>").

Output (`pqae.shapenetpart.FORMAT`): group `train` = the reference's `trainval` (train list
plus val list, 14,007 shapes) and group `test` (2,874). Shapes have different point counts,
so each group holds all xyz concatenated plus offsets, rather than padding. Normals are
dropped (the reference runs with normals off); coordinates are stored as read and normalised
at load time. Order within a group: categories in file order, then model ids sorted (the
order the reference's dataset walks them).

Every file is validated: the category file names only the 16 known categories, every list
entry resolves to an existing file, every row has 7 numeric columns, every label is an
integer among its category's parts. Problems are collected and reported with the file (and
line); if there is any, nothing is written and the command exits non-zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from data_prep.common import ConversionError, run
from pqae.log import atomic_output
from pqae.shapenetpart import CATEGORIES, FORMAT_VERSION, NUM_PARTS, PART_START

LISTS = {"train": ("train", "val"), "test": ("test",)}


@dataclass(frozen=True)
class Config:
    root: Path
    """The official `shapenetcore_partanno_segmentation_benchmark_v0_normal` directory."""
    out: Path
    """Output HDF5 file."""



def read_categories(root: Path) -> dict[str, int]:
    """synset -> category index, from synsetoffset2category.txt."""
    path = root / "synsetoffset2category.txt"
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: --root must be the official ShapeNetPart directory holding "
            f"synsetoffset2category.txt, train_test_split/ and one folder per synset")
    synsets = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in CATEGORIES:
            raise ConversionError(
                f"{path} line {n}: expected 'CategoryName<whitespace>synset' with a name among "
                f"{', '.join(CATEGORIES)}; found {line!r}")
        synsets[parts[1]] = CATEGORIES.index(parts[0])
    return synsets


def read_list(root: Path, name: str) -> list[tuple[str, str]]:
    """(synset, model id) pairs of train_test_split/shuffled_<name>_file_list.json."""
    path = root / "train_test_split" / f"shuffled_{name}_file_list.json"
    if not path.is_file():
        raise ConversionError(f"split list {path} not found (expected under --root)")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    pairs = []
    for e in entries:
        parts = e.split("/") if isinstance(e, str) else []
        if len(parts) != 3:
            raise ConversionError(
                f"{path}: expected entries 'shape_data/<synset>/<model_id>'; found {e!r}")
        pairs.append((parts[1], parts[2]))
    return pairs


def read_shape(path: Path, category: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                   str | None]:
    """xyz (n, 3) float32 and labels (n,) uint8 of one shape file, or an error message."""
    try:
        rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError:
        rows = None
    if rows is None or rows.shape[1] != 7 or rows.shape[0] == 0:
        # Slow path, only for a bad file: find the first offending line to name it.
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            cols = line.split()
            try:
                [float(c) for c in cols]
            except ValueError:
                cols = None
            if cols is None or len(cols) != 7:
                return None, None, (f"{path} line {n}: expected 7 numeric columns "
                                    f"(x y z nx ny nz part_label); found {line[:80]!r}")
        return None, None, f"{path}: no rows (expected 7 numeric columns per line)"
    # Checked as stored (float32): a value finite in float64 can overflow to inf there.
    if not np.isfinite(rows[:, :6].astype(np.float32)).all():
        n = int(np.argmax(~np.isfinite(rows[:, :6].astype(np.float32)).all(1))) + 1
        return None, None, f"{path} line {n}: NaN, inf or beyond float32 coordinates"
    labels = rows[:, 6]
    lo, hi = PART_START[category], PART_START[category] + NUM_PARTS[category] - 1
    bad = (labels != np.round(labels)) | (labels < lo) | (labels > hi)
    if bad.any():
        n = int(np.argmax(bad))
        return None, None, (f"{path} line {n + 1}: part label {labels[n]:g} is not a part of "
                            f"{CATEGORIES[category]} (expected an integer in {lo}..{hi})")
    return rows[:, :3].astype(np.float32), labels.astype(np.uint8), None


def write_split(f: h5py.File, root: Path, split: str, shapes: list[tuple[str, str, int]],
                problems: list[str]) -> None:
    points, labels, names = [], [], []
    for synset, model_id, category in shapes:
        xyz, lab, err = read_shape(root / synset / f"{model_id}.txt", category)
        if err:
            problems.append(err)
            continue
        points.append(xyz)
        labels.append(lab)
        names.append(f"{synset}/{model_id}")
    if problems:
        return
    g = f.create_group(split)
    g.create_dataset("points", data=np.concatenate(points))
    g.create_dataset("labels", data=np.concatenate(labels))
    g.create_dataset("offsets", data=np.cumsum([0] + [len(p) for p in points]).astype(np.int64))
    g.create_dataset("category", data=np.array([s[2] for s in shapes], dtype=np.int64))
    g.create_dataset("names", data=np.array(names, dtype="S"))


def main(cfg: Config) -> Path:
    """Convert; return the output path. Raises ConversionError listing every bad file."""
    synsets = read_categories(cfg.root)
    order = {s: i for i, s in enumerate(synsets)}  # category file order
    splits, problems = {}, []
    for split, lists in LISTS.items():
        pairs = sorted({p for name in lists for p in read_list(cfg.root, name)},
                       key=lambda p: (order.get(p[0], -1), p[1]))
        shapes = []
        for synset, model_id in pairs:
            if synset not in synsets:
                problems.append(f"split list entry {synset}/{model_id}: synset {synset} is not "
                                f"in {cfg.root / 'synsetoffset2category.txt'}")
            elif not (cfg.root / synset / f"{model_id}.txt").is_file():
                problems.append(f"split list entry {synset}/{model_id}: expected file "
                                f"{cfg.root / synset / (model_id + '.txt')}, not found")
            else:
                shapes.append((synset, model_id, synsets[synset]))
        splits[split] = shapes
    print(f"converting {', '.join(f'{k} {len(v)}' for k, v in splits.items())} shapes from "
          f"{cfg.root}", flush=True)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cfg.out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["source_root"] = str(cfg.root.resolve())
            f.attrs["categories"] = json.dumps(CATEGORIES)
            for split, shapes in splits.items():
                if not shapes:
                    problems.append(f"split {split!r} has no shapes (lists "
                                    f"{', '.join(LISTS[split])} resolve to nothing)")
                write_split(f, cfg.root, split, shapes, problems)  # writes only while valid
        if problems:
            raise ConversionError(f"{len(problems)} problem(s) in {cfg.root}; no output "
                                  f"written:\n  " + "\n  ".join(problems))
    print(f"wrote {cfg.out}", flush=True)
    return cfg.out


if __name__ == "__main__":
    run(Config, main)
