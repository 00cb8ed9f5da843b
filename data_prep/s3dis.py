"""Convert the raw S3DIS release into one HDF5 file for `pqae.s3dis.load_rooms`.

    python -m data_prep.s3dis --root data/Stanford3dDataset_v1.2_Aligned_Version --out data/s3dis.h5
    python -m data_prep.s3dis --root ... --out /tmp/s3dis_a1.h5 --areas 1   # one area only

Input: `<root>/Area_k/<room>/Annotations/<class>_<n>.txt`, lines of `x y z r g b`. The class is
the file name up to the first "_"; the 13 classes of `CLASSES` (ceiling 0 .. clutter 12) keep
their index, any other name (e.g. `stairs`) becomes clutter and is reported.

Output: group `rooms` with one float32 array (N, 7) = x y z r g b label per room, named
`Area_k_<room>` (the columns and names of the reference's `.npy` files), xyz shifted so that
the room's minimum is at the origin. Root attributes `format_version`, `classes`,
`source_root`.

Malformed lines (not exactly six finite numbers, e.g. the stray character in
Area_5/hallway_6/Annotations/ceiling_1.txt that the reference asks to fix by hand) are SKIPPED
and reported by file and line number. We skip rather than repair: a guessed repair can invent
a wrong coordinate (a stray byte has also been seen standing in for a digit), while dropping
one point in a million changes nothing measurable. A room with no readable point, or a missing
`Annotations` folder, is an error; the file is written under a temporary name and renamed only
when every room converted.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from data_prep.common import ConversionError, run
from pqae.log import atomic_output
from pqae.s3dis import CLASSES, CLUTTER, S3DIS_FORMAT_VERSION


@dataclass(frozen=True)
class Config:
    root: Path
    """The `Stanford3dDataset_v1.2_Aligned_Version` directory (holds `Area_1` ... `Area_6`)."""
    out: Path
    """Output HDF5 file."""
    areas: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    """Areas to convert."""
    workers: int = 8
    """Rooms parsed in parallel (processes); 1 parses in this process."""
    check_counts: bool = True
    """Require each area's room count of the reference's list (`meta/anno_paths.txt`, 272
    rooms: 44, 40, 23, 49, 68, 48), so that the rooms converted are the rooms it trains and
    tests on; --no-check-counts for a subset on purpose."""


# Rooms per area in the reference's `meta/anno_paths.txt` (272 in all).
REFERENCE_ROOMS = {1: 44, 2: 40, 3: 23, 4: 49, 5: 68, 6: 48}



def class_index(file_name: str) -> tuple[int, str]:
    """`chair_3.txt` -> (8, "chair"); an unknown class name maps to clutter."""
    name = file_name.split("_")[0]
    return (CLASSES.index(name) if name in CLASSES else CLUTTER), name


def parse_lines(path: Path) -> tuple[np.ndarray, list[str]]:
    """(n, 6) float64 points of an annotation file and a note for each skipped line.

    The fast path is numpy's C parser; only when it rejects the file do we go line by line to
    find, report and skip the malformed lines."""
    try:
        pts = np.loadtxt(path, dtype=np.float64, ndmin=2, encoding="latin-1")
        if pts.shape[1] == 6 and np.isfinite(pts).all():
            return pts, []
    except ValueError:
        pass
    rows, notes = [], []
    with open(path, encoding="latin-1") as f:  # latin-1: any stray byte decodes
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values = [float(v) for v in line.split()]
            except ValueError:
                values = []
            if len(values) == 6 and all(math.isfinite(v) for v in values):
                rows.append(values)
            else:
                notes.append(f"{path}:{number}: skipped malformed line {line.rstrip()!r}")
    return np.array(rows, dtype=np.float64).reshape(-1, 6), notes


def convert_room(room_dir: Path) -> tuple[np.ndarray | None, list[str], list[str], set[str]]:
    """One room -> ((N, 7) float32 or None, problems, skipped-line notes, unknown class names)."""
    annotations = room_dir / "Annotations"
    if not annotations.is_dir():
        return None, [f"{room_dir}: no Annotations folder"], [], set()
    parts, notes, unknown = [], [], set()
    for f in sorted(annotations.glob("*.txt")):
        label, name = class_index(f.name)
        if name not in CLASSES:
            unknown.add(name)
        try:
            pts, skipped = parse_lines(f)
        except OSError as e:
            return None, [f"{f}: unreadable ({e})"], notes, unknown
        notes += skipped
        parts.append(np.concatenate([pts, np.full((len(pts), 1), label, np.float64)], axis=1))
    room = np.concatenate(parts) if parts else np.zeros((0, 7))
    if len(room) == 0:
        return None, [f"{room_dir}: no points"], notes, unknown
    room[:, :3] -= room[:, :3].min(axis=0)  # room minimum at the origin (in float64)
    stored = room.astype(np.float32)
    if not np.isfinite(stored).all():  # finite in float64 is not enough: 1e300 becomes inf
        row = int(np.argmax(~np.isfinite(stored).all(1)))
        return None, [f"{room_dir}: values beyond float32 (point {row}: {room[row, :6].tolist()}), "
                      f"which the file stores"], notes, unknown
    return stored, [], notes, unknown


def list_rooms(cfg: Config) -> list[tuple[str, Path]]:
    rooms = []
    for area in cfg.areas:
        area_dir = cfg.root / f"Area_{area}"
        if not area_dir.is_dir():
            raise FileNotFoundError(f"{area_dir} not found (is --root the "
                                    f"Stanford3dDataset_v1.2_Aligned_Version directory?)")
        rooms += [(f"Area_{area}_{d.name}", d) for d in sorted(area_dir.iterdir()) if d.is_dir()]
    return rooms


def main(cfg: Config) -> dict:
    """Convert; return a report {"out", "rooms", "points", "skipped_lines", "unknown_classes"}.
    Raises ConversionError listing every room that could not be converted."""
    rooms = list_rooms(cfg)
    if cfg.check_counts:
        found = {a: sum(n.startswith(f"Area_{a}_") for n, _ in rooms) for a in cfg.areas}
        wrong = {a: n for a, n in found.items() if n != REFERENCE_ROOMS.get(a)}
        if wrong:
            raise ConversionError(
                "room directories per area " + ", ".join(f"Area_{a}: {n} (the reference's list: "
                                                         f"{REFERENCE_ROOMS.get(a)})" for a, n in wrong.items())
                + f" in {cfg.root}; a subset on purpose? add --no-check-counts")
    print(f"converting {len(rooms)} rooms of area(s) {list(cfg.areas)} from {cfg.root}", flush=True)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    problems, skipped, unknown, points = [], [], set(), 0
    t0 = time.time()
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    results = (pool.map if pool else map)(convert_room, [d for _, d in rooms])
    with atomic_output(cfg.out) as tmp, (pool or nullcontext()):
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = S3DIS_FORMAT_VERSION
            f.attrs["classes"] = list(CLASSES)
            f.attrs["source_root"] = str(cfg.root.resolve())
            group = f.create_group("rooms")
            for i, ((name, _), (room, bad, notes, unk)) in enumerate(zip(rooms, results), 1):
                problems += bad
                skipped += notes
                unknown |= unk
                for note in notes:
                    print(note, flush=True)
                if room is not None and not problems:
                    group.create_dataset(name, data=room, chunks=(min(len(room), 65536), 7))
                    points += len(room)
                print(f"{i}/{len(rooms)} {name}: {0 if room is None else len(room)} points | "
                      f"{time.time() - t0:.0f} s", flush=True)
        if problems:
            raise ConversionError(f"{len(problems)} problem(s) in {cfg.root}; no output written:"
                                  "\n  " + "\n  ".join(problems))
    if unknown:
        print(f"class names mapped to clutter: {sorted(unknown)}", flush=True)
    print(f"wrote {cfg.out}: {len(rooms)} rooms, {points} points, {len(skipped)} malformed "
          f"line(s) skipped, {time.time() - t0:.0f} s", flush=True)
    return {"out": cfg.out, "rooms": [n for n, _ in rooms], "points": points,
            "skipped_lines": skipped, "unknown_classes": sorted(unknown)}


if __name__ == "__main__":
    run(Config, main)
