"""Your own point clouds: a folder tree of files -> the HDF5 files the scripts read as they are.

    python -m data_prep.folder --root my_scans --out data/my_scans.h5
    python pretrain.py --data-path data/my_scans.h5          # unlabelled: the pretraining format
    python -m data_prep.folder --root big_scans --out data/big_scans --shard-size 20000
    python -m data_prep.folder --root big_scans --out data/big_scans --shard-size 20000 --resume
    python pretrain.py --data-path data/big_scans            # a directory of shards
    python -m data_prep.folder --root my_objects --out data/my_objects.h5 --labels folders
    python -m data_prep.folder --root my_objects --out data/my_objects.h5 --labels csv \
        --label-file labels.csv --split-files train.txt test.txt
    python finetune_cls.py --data modelnet40 --data-path data/my_objects.h5 --num-classes K

Unlabelled (the default): every cloud under --root, in the pretraining format of
`data_prep.shapenet55` (`train/points` (S, P, 3) float32, an empty `test`), which
`pretrain.py --data-path` reads. With `--shard-size K`, --out is a directory of such files,
`shard-00000.h5`, `shard-00001.h5`, ..., K clouds at most each, and a `manifest.json` written
last: shard i holds the usable files among [i*K, (i+1)*K) of the sorted file list, so a
conversion that was interrupted continues with `--resume`, keeping the complete shards.
Labelled: the classification format (`train` and `test`, each with `points` (S, P, 3) float32
and `labels` (S,) int64; class names, sorted, in the attribute `classes`), the class taken
from the first-level folder (`--labels folders`) or from a CSV of `file,label` lines
(`--labels csv --label-file`), split at --seed by `--test-fraction` or by two lists of files
(`--split-files train.txt test.txt`). P is `--points` (8192, ShapeNet-55's count, by default).

Formats read without extras: `.npy`, `.npz` (the array `points`, `xyz` or the only one),
`.txt` / `.xyz` / `.pts` / `.csv` (whitespace or commas; the first three columns are x y z;
a header line is skipped). With `pip install -e ".[io]"`: `.ply` (ASCII and binary, plyfile),
`.pcd` (ASCII, binary, binary_compressed; pypcd4), `.las` (laspy; `.laz` also needs a LAZ
backend such as lazrs), and meshes `.obj` / `.off` / `.stl` / `.glb` (trimesh), sampled on
their surface, area-weighted, at --points points. Without its reader such a file is skipped
with the command that installs it. Other extensions are skipped as unknown.

Extra per-point channels follow the points through resampling and are stored beside them,
in every group of the file: `colors` (S, P, 3) uint8 0-255 (PLY red/green/blue, PCD rgb,
LAS red/green/blue scaled down from 16 bits, npz `colors`), `normals` (S, P, 3) of --dtype
(PLY nx/ny/nz, PCD normal_x/y/z, npz `normals`, a mesh's face normals) and `intensity` (S, P)
float32 (LAS, PCD, PLY, npz `intensity`). A channel is stored only when every cloud of the
file has it (finite); otherwise the summary says how many had it. Text columns after x y z
are ambiguous and never read. Pretraining reads only `points`.

Every cloud: rows with a non-finite coordinate are dropped (counted); fewer than
`--min-points` left: skipped; then resampled to --points, by farthest point sampling
(`--sample fps`, the FPS kernel, on the GPU when there is one, of a copy centred and scaled
into the unit sphere, from at most --fps-pool x --points random points) or uniformly at
random (`--sample random`, with replacement when the cloud is smaller). Each file draws
from its own generator, seeded by (--seed, its index in the sorted list): files are read by
--workers processes and the output is the same for any count. A file that cannot be used
is skipped and listed with its reason in `<out>.skipped.txt` and the summary; `--strict`
makes any skip fatal. Every output file is written under a temporary name and renamed when complete,
its datasets contiguous and uncompressed (pretraining maps them from the file), with the
attribute `checked_finite` (no NaN, inf or coordinate beyond MAX_COORD: pretraining skips
its own scan).
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import re
import signal
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import h5py
import numpy as np
import torch

from data_prep.common import ConversionError, run
from pqae.data import CLS_FORMAT_VERSION, MAX_COORD, SHAPENET55_FORMAT_VERSION
from pqae.log import atomic_output, format_eta, write_json
from pqae.readers import CHANNELS, Skip, read_file, to_colors

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
SHARD_FILE = re.compile(r"shard-(\d{5,})\.(h5|skipped\.json)(\.tmp)?")
MANIFEST = "manifest.json"
FPS_BATCH_POINTS = 1 << 22  # FPS in the parent: candidate points per launch, at most


@dataclass(frozen=True)
class Config:
    root: Path
    """the folder to convert; every file under it is read (sorted by path)."""
    out: Path
    """the HDF5 file to write; with --shard-size, the directory of shards."""
    labels: Literal["none", "folders", "csv"] = "none"
    """none: unlabelled, the pretraining format. folders: one class per first-level folder;
    csv: the class of each file from --label-file. Both give the classification format."""
    label_file: Path | None = None
    """--labels csv: lines `file,label`, the file relative to --root (a header line such as
    `file,label` is allowed). Files under --root that it does not name are skipped."""
    split_files: tuple[Path, Path] | None = None
    """labelled sets: two lists of files relative to --root, one per line, the train files
    then the test files, instead of --test-fraction. A file in neither list is skipped."""
    points: int = 8192
    """points per cloud in the output. Pretraining reads any count (at least its
    --num-points); the classification loaders expect 8192 (--data modelnet40) or 2048
    (--data scanobjectnn)."""
    dtype: Literal["float32", "float16"] = "float32"
    """the stored coordinates' (and normals') type; float16 halves the file of an unlabelled
    set (pretraining widens it on load); a cloud beyond +-65504 is then skipped. The
    classification format is float32."""
    sample: Literal["fps", "random"] = "fps"
    """how a cloud is brought to --points: farthest point sampling, or uniform at random."""
    fps_pool: int = 16
    """FPS picks from a random subset of at most fps_pool x --points points of a larger cloud
    (0: from every point). FPS costs time in proportion to its input: from 10 million points
    it takes minutes a cloud on a CPU; from 16 x 8192 random ones, a fraction of that, and
    the picks still cover the shape."""
    channels: Literal["all", "none"] = "all"
    """all: keep the colors, normals and intensity a file has (see the module doc); none:
    only the coordinates."""
    min_points: int = 64
    """a cloud with fewer finite points than this is skipped."""
    test_fraction: float = 0.2
    """labelled sets without --split-files: the share of each class put in `test` (at least
    one when the class has two clouds or more), drawn at --seed."""
    seed: int = 0
    """file i draws (mesh sampling, resampling) from a generator seeded by (seed, i), i its
    index in the sorted list of files under --root; the train/test split from one seeded by
    seed."""
    strict: bool = False
    """stop at the first file that cannot be used instead of skipping it."""
    workers: int = min(8, os.cpu_count() or 1)
    """processes that read and resample files; the output does not depend on it."""
    shard_size: int = 0
    """unlabelled sets: write --out as a directory of shards of at most this many clouds,
    one read and written at a time (0: one file, built in memory)."""
    resume: bool = False
    """--shard-size: keep the complete shards already in --out (written with the same
    settings from the same files) and write the others."""


# --------------------------------------------------------------------------------------------
# One file -> one cloud of --points (in a worker process)


@dataclass
class Prepared:
    """One file read and resampled, or the reason it was skipped. arrays: points (P, 3)
    float32 and the channels it has, colors (P, 3) uint8, normals (P, 3) of --dtype,
    intensity (P,) float32; with fps_pending, the M > P candidates FPS still picks from."""
    index: int  # in the sorted file list
    arrays: dict[str, np.ndarray] | None
    reason: str | None = None
    dropped: int = 0  # rows with a non-finite coordinate
    fps_pending: bool = False


def prepare(cfg: Config, fps_here: bool, task: tuple[int, Path]) -> Prepared:
    """Read file `task` = (index, path), check it and bring it to --points, drawing from its
    own generator. fps_here False leaves FPS to the caller (the GPU of the parent)."""
    index, path = task
    rng = np.random.default_rng([cfg.seed, index])
    dropped = 0
    try:
        cloud, extra = read_file(path, cfg.points, rng, cfg.channels == "all")
        finite = np.isfinite(cloud).all(1)
        dropped = int((~finite).sum())
        cloud = cloud[finite]
        if len(cloud) < cfg.min_points:
            raise Skip(f"{len(cloud)} finite points, fewer than --min-points {cfg.min_points}")
        if np.abs(cloud).max() > MAX_COORD or (cloud.max(0) == cloud.min(0)).all():
            raise Skip(f"zero extent or coordinates beyond +-{MAX_COORD:g}: it cannot be "
                       f"normalised")
        if cfg.dtype == "float16" and np.abs(cloud).max() > FLOAT16_MAX:
            raise Skip(f"coordinates beyond +-{FLOAT16_MAX:g} do not fit --dtype float16")
        if cfg.dtype == "float16" and (np.ptp(cloud.astype(np.float16), 0) == 0).all():
            raise Skip("its extent is below the precision of --dtype float16 at its position")
    except Skip as why:
        return Prepared(index, None, str(why), dropped)
    arrays = {"points": cloud, **_channels({k: v[finite] for k, v in extra.items()}, cfg.dtype)}
    idx, fps_pending = pick(len(cloud), cfg.points, cfg.sample, cfg.fps_pool, rng)
    arrays = {k: v[idx] for k, v in arrays.items()}
    arrays["points"] = arrays["points"].astype(np.float32)
    if fps_pending and fps_here:
        arrays = {k: v[fps_indices([arrays["points"]], cfg.points)[0]] for k, v in arrays.items()}
        fps_pending = False
    return Prepared(index, arrays, None, dropped, fps_pending)


def _channels(extra: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The channels in their stored types; one with a value that is not finite (or beyond
    float16) counts as absent from the cloud."""
    out = {}
    for name, values in extra.items():
        if name == "colors":
            values = to_colors(values)
        else:
            with np.errstate(over="ignore"):  # beyond float16: inf, and so absent
                values = values.astype(dtype if name == "normals" else np.float32)
            if not np.isfinite(values).all():
                values = None
        if values is not None:
            out[name] = values
    return out


def pick(n: int, points: int, how: str, fps_pool: int,
         rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Which of n points to keep: (indices, False), `points` of them; or (candidates, True)
    when FPS is still to pick `points` from those, in that order (it starts at the first).
    A cloud of `points` or fewer keeps every point once, then random duplicates; random:
    uniform, with replacement only when the cloud is smaller."""
    if n <= points:
        return np.concatenate([rng.permutation(n), rng.choice(n, points - n)]), False
    if how == "random":
        return rng.choice(n, points, replace=False), False
    order = rng.permutation(n)  # a random start for FPS, and the random pool
    return (order[:fps_pool * points] if fps_pool else order), True


def fps_indices(pools: list[np.ndarray], points: int, device: str = "cpu") -> list[np.ndarray]:
    """Farthest point sampling (the kernels' FPS) of `points` indices from each (M, 3)
    float32 pool, on `device`; pools of one size share a launch. Each pool is centred and
    scaled into the unit sphere first: the kernels' FPS never picks a point within ~0.03 of
    the origin, which in raw coordinates (a small object in metres) can be the whole cloud."""
    from kernels import fps

    def unit(pool: np.ndarray) -> np.ndarray:
        x = pool.astype(np.float64) - pool.astype(np.float64).mean(0)
        radius = np.linalg.norm(x, axis=1).max()
        return (x / radius if radius > 0 else x).astype(np.float32)

    out: list[np.ndarray] = [np.empty(0)] * len(pools)
    by_size: dict[int, list[int]] = {}
    for i, pool in enumerate(pools):
        by_size.setdefault(len(pool), []).append(i)
    for m, members in by_size.items():
        step = max(1, FPS_BATCH_POINTS // m)
        for s in range(0, len(members), step):
            batch = members[s:s + step]
            x = torch.from_numpy(np.stack([unit(pools[i]) for i in batch])).to(device)  # (B, M, 3)
            for i, idx in zip(batch, fps(x, points).cpu().numpy()):
                out[i] = idx
    return out


def fps_device(cfg: Config) -> str | None:
    """Where FPS runs in this process: "cuda" when there is a GPU (the workers read and draw
    and never touch CUDA), None when each worker runs it on its CPU."""
    return "cuda" if cfg.sample == "fps" and torch.cuda.is_available() else None


def _worker_init() -> None:
    torch.set_num_threads(1)  # the processes share the cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends them


def _prepare_chunk(work, tasks: list[tuple[int, Path]]) -> list[Prepared]:
    return [work(task) for task in tasks]


class Workers:
    """`work` (prepare) of a stream of tasks in `workers` processes (the platform's start
    method), the results in task order, at most `ahead` chunks of `chunk` tasks in flight (the
    memory stays bounded however many files). A process that dies (killed for memory, or a
    reader that crashes on a damaged file) does not hang or stop the run: the tasks of its
    chunk are run again one at a time, and a file whose process dies again is skipped with
    that reason. workers 1: in this process."""

    def __init__(self, work, workers: int, chunk: int = 8, ahead: int = 4):
        self.work, self.workers, self.chunk, self.ahead = work, workers, chunk, ahead * workers
        self.pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _restart(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context(),
                                        initializer=_worker_init)

    def map(self, tasks: list[tuple[int, Path]]) -> Iterator[Prepared]:
        if self.workers <= 1:
            yield from map(self.work, tasks)
            return
        if self.pool is None:
            self._restart()
        chunks = iter([tasks[i:i + self.chunk] for i in range(0, len(tasks), self.chunk)])
        flight: deque = deque()
        for chunk in islice(chunks, self.ahead):
            flight.append((chunk, self.pool.submit(_prepare_chunk, self.work, chunk)))
        while flight:
            chunk, future = flight.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:  # every chunk in flight is lost; this one's files alone
                self._restart()
                results = [self._alone(task) for task in chunk]
                flight = deque((c, self.pool.submit(_prepare_chunk, self.work, c))
                               for c, _ in flight)
            for more in islice(chunks, 1):
                flight.append((more, self.pool.submit(_prepare_chunk, self.work, more)))
            yield from results

    def _alone(self, task: tuple[int, Path]) -> Prepared:
        try:
            return self.pool.submit(_prepare_chunk, self.work, [task]).result()[0]
        except BrokenProcessPool:
            self._restart()
            return Prepared(task[0], None, "its worker process died reading it (killed for "
                                           "memory, or a crash in its reader)")


# --------------------------------------------------------------------------------------------
# The files, their labels and splits


def list_files(cfg: Config) -> list[Path]:
    """Every file under --root, sorted, but for --label-file and --split-files."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    own = {Path(p).resolve() for p in (cfg.label_file, *(cfg.split_files or ())) if p}
    own = {root / p.relative_to(root.resolve()) for p in own if p.is_relative_to(root.resolve())}
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in own)


def read_labels(cfg: Config, rels: list[str]) -> tuple[list[str | None], dict[int, str]]:
    """Each file's class name (None when unlabelled), and {file index: why it is skipped}
    for the files without one."""
    if cfg.labels == "none":
        return [None] * len(rels), {}
    if cfg.labels == "folders":
        for rel in rels:
            if "/" not in rel:
                raise ConversionError(f"{Path(cfg.root) / rel}: with --labels folders every "
                                      f"file must sit in a class folder (ROOT/CLASS/...); this "
                                      f"one is directly under --root")
        return [rel.split("/")[0] for rel in rels], {}
    if cfg.label_file is None:
        raise ConversionError("--labels csv needs --label-file FILE, its lines `file,label` "
                              "with the file relative to --root")
    path, known = Path(cfg.label_file), set(rels)
    if not path.is_file():
        raise FileNotFoundError(f"--label-file {path} not found")
    table: dict[str, str] = {}
    missing, problems, first = [], [], True
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            is_first, first = first, False
            if len(cells) != 2 or not all(cells):
                problems.append(f"line {line} has {row!r}")
                continue
            name = Path(cells[0]).as_posix()
            if name in table:
                problems.append(f"line {line} names {cells[0]} again")
            elif name in known:
                table[name] = cells[1]
            elif not (is_first and "." not in Path(name).name):  # else a header, `file,label`
                missing.append(f"{cells[0]} (line {line})")
    if missing or problems:
        raise ConversionError(
            f"{path}: expected lines `file,label`, each file relative to --root {cfg.root}, "
            f"once; found " + "; ".join(
                ([f"{len(missing)} rows naming files not under --root: "
                  f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"]
                 if missing else []) + problems[:10]))
    skip = {i: f"not in {path.name}" for i, rel in enumerate(rels) if rel not in table}
    return [table.get(rel) for rel in rels], skip


def read_splits(cfg: Config, rels: list[str]) -> tuple[list[bool | None], dict[int, str]]:
    """--split-files: whether each file is in the test list (None: in neither), and
    {file index: why it is skipped} for those in neither."""
    known, listed = set(rels), {}
    missing, both = [], []
    for is_test, path in enumerate(map(Path, cfg.split_files)):
        if not path.is_file():
            raise FileNotFoundError(f"--split-files: {path} not found")
        for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not text.strip():
                continue
            name = Path(text.strip()).as_posix()
            if name not in known:
                missing.append(f"{path.name} line {line}: {text.strip()}")
            elif listed.get(name, is_test) != is_test:
                both.append(name)
            listed[name] = bool(is_test)
    if missing or both:
        train, test = cfg.split_files
        raise ConversionError(
            f"--split-files {train} {test}: expected files relative to --root {cfg.root}, one "
            f"per line, each in one list; found " + "; ".join(
                ([f"{len(missing)} lines naming files not under --root: "
                  f"{', '.join(missing[:10])}"] if missing else [])
                + ([f"{len(both)} files in both lists: {', '.join(both[:10])}"] if both else [])))
    reason = f"in neither {Path(cfg.split_files[0]).name} nor {Path(cfg.split_files[1]).name}"
    return [listed.get(rel) for rel in rels], {i: reason for i, rel in enumerate(rels)
                                               if rel not in listed}


# --------------------------------------------------------------------------------------------
# Clouds of one output file


@dataclass
class Part:
    """The files of one output file, read in file order."""
    index: list[int] = field(default_factory=list)  # file index of each cloud
    clouds: list[dict[str, np.ndarray]] = field(default_factory=list)  # see Prepared.arrays
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (file index, reason)
    dropped: int = 0


class Progress:
    """A line every `every` seconds: files done, rate, time left."""

    def __init__(self, total: int, every: float = 30.0):
        self.total, self.every, self.done = total, every, 0
        self.t0 = self.last = time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last, rate = now, self.done / (now - self.t0)
            print(f"{self.done}/{self.total} files | {rate:.0f} files/s | "
                  f"eta {format_eta((self.total - self.done) / rate)}", flush=True)


def gather(cfg: Config, files: list[Path], span: range, skip: dict[int, str], results,
           device: str | None, progress: Progress) -> Part:
    """The Prepared `results` of the files of `span` (but those of `skip`, not read), in
    order, with the FPS left to this process run on `device` a batch at a time (the
    candidates of a whole shard would not fit in memory)."""
    part, pending = Part(), []

    def run_fps():
        picks = fps_indices([part.clouds[j]["points"] for j in pending], cfg.points, device)
        for j, idx in zip(pending, picks):
            part.clouds[j] = {k: v[idx] for k, v in part.clouds[j].items()}
        pending.clear()

    for i in span:
        result = Prepared(i, None, skip[i]) if i in skip else next(results)
        assert result.index == i, (result.index, i)
        part.dropped += result.dropped
        if result.reason is not None:
            if cfg.strict:
                raise ConversionError(f"{files[i]}: {result.reason} (--strict)")
            part.skipped.append((i, result.reason))
        else:
            part.index.append(i)
            part.clouds.append(result.arrays)
            if result.fps_pending:
                pending.append(len(part.clouds) - 1)
                if len(pending) * len(result.arrays["points"]) >= FPS_BATCH_POINTS:
                    run_fps()
        progress.tick()
    run_fps()
    return part


def stack(cfg: Config, clouds: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    """One array of the clouds: (S, P, 3), or (S, P) for intensity, in its stored type,
    filled cloud by cloud (no second copy of the set)."""
    dtype = {"points": cfg.dtype, "normals": cfg.dtype, "colors": np.uint8}.get(name, np.float32)
    shape = (cfg.points,) if name == "intensity" else (cfg.points, 3)
    out = np.empty((len(clouds), *shape), dtype)
    for i, c in enumerate(clouds):
        out[i] = c[name]
    return out


def describe(part: Part) -> dict:
    """What an output file records of its clouds: counts, and the channels it stores (those
    every cloud has)."""
    counts = Counter(name for c in part.clouds for name in c if name != "points")
    return {"clouds": len(part.clouds), "skipped": len(part.skipped),
            "points_dropped": part.dropped, "channel_counts": dict(counts),
            "stored": [n for n in CHANNELS if part.clouds and counts[n] == len(part.clouds)]}


def write_part(cfg: Config, path: Path, part: Part, stored: list[str], labels: list[str | None],
               test: list[bool | None], attrs: dict) -> dict:
    """Write the clouds of `part` to `path` (atomically, datasets contiguous and unfiltered)
    in the pretraining or the classification format, the `stored` channels beside the
    points, and `attrs`. Returns the split: {train, test, classes}."""
    if cfg.labels == "none":
        groups = {"train": part.clouds, "test": []}
        split = {"train": len(part.clouds)}
    else:
        names = sorted(set(labels[i] for i in part.index))
        if all(s.lstrip("-").isdigit() for s in names):
            names.sort(key=int)  # class names that are all integers: in numeric order
        y = np.array([names.index(labels[i]) for i in part.index], np.int64)
        if cfg.split_files:
            is_test = np.array([bool(test[i]) for i in part.index], bool)
        else:
            rng, is_test = np.random.default_rng(cfg.seed), np.zeros(len(y), bool)
            for k in range(len(names)):
                members = np.flatnonzero(y == k)
                n_test = int(round(cfg.test_fraction * len(members)))
                n_test = max(n_test, 1) if len(members) > 1 and cfg.test_fraction > 0 else n_test
                is_test[rng.permutation(members)[:n_test]] = True
        groups = {g: [part.clouds[j] for j in np.flatnonzero(mask)]
                  for g, mask in (("train", ~is_test), ("test", is_test))}
        split = {"train": int((~is_test).sum()), "test": int(is_test.sum()),
                 "classes": len(names)}
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        for g, clouds in groups.items():
            for name in ("points", *stored):
                f[f"{g}/{name}"] = stack(cfg, clouds, name)  # contiguous, unfiltered
            if cfg.labels != "none":
                f[f"{g}/labels"] = y[~is_test] if g == "train" else y[is_test]
        if cfg.labels == "none":
            f.attrs["format_version"] = SHAPENET55_FORMAT_VERSION
        else:
            f.attrs["format_version"] = CLS_FORMAT_VERSION
            f.attrs["classes"] = names
        f.attrs["source_root"] = str(cfg.root)
        f.attrs["num_points"] = cfg.points
        f.attrs["checked_finite"] = True  # rows with NaN/inf dropped, |coordinate| <= MAX_COORD
        for k, v in attrs.items():
            f.attrs[k] = v
    return split


# --------------------------------------------------------------------------------------------
# Shards


def shard_name(k: int, n_shards: int) -> str:
    return f"shard-{k:0{max(5, len(str(n_shards - 1)))}d}.h5"


def shard_identity(cfg: Config, files: list[Path], rels: list[str], span: range) -> dict:
    """What a shard was written from, recorded in it: its files (names and sizes) and the
    settings that change its content. A shard --resume keeps must match."""
    digest = hashlib.sha256()
    for i in span:
        digest.update(f"{rels[i]}\t{files[i].stat().st_size}\n".encode())
    settings = {k: getattr(cfg, k) for k in ("points", "dtype", "sample", "fps_pool", "channels",
                                             "min_points", "seed", "shard_size")}
    return {"first_file": span.start, "files": len(span), "files_sha256": digest.hexdigest(),
            "settings": settings}


def open_shard_dir(cfg: Config, out: Path, identities: list[dict]) -> dict[int, dict]:
    """Check --out for a sharded conversion and tidy it: leftover temporary files, shards
    past the last and the manifest (written again at the end) removed. Returns {shard index:
    its record} of the complete shards kept (--resume)."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; with --shard-size it is the directory of "
                              f"shards to write (shard-00000.h5, ... and {MANIFEST})")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(out.iterdir())
    foreign = [p.name for p in entries
               if not SHARD_FILE.fullmatch(p.name) and p.name not in (MANIFEST, MANIFEST + ".tmp")]
    if foreign:
        raise ConversionError(f"--out {out} holds files that are not this converter's shards "
                              f"({', '.join(foreign[:5])}): expected a new or empty directory, "
                              f"since pretraining reads every .h5 in it")
    if entries and not cfg.resume:
        raise ConversionError(f"--out {out} already holds shards ({entries[0].name}, ...): pass "
                              f"--resume to continue that conversion, or remove it")
    names = {shard_name(k, len(identities)): k for k in range(len(identities))}
    for p in entries:
        m = SHARD_FILE.fullmatch(p.name)
        if not m or m[3] or p.with_suffix("").with_suffix(".h5").name not in names:
            p.unlink()  # the manifest, a .tmp, or a shard past the last
    kept = {}
    for name, k in names.items():
        record = read_shard_record(cfg, out / name, identities[k])
        if record is not None:
            kept[k] = record
    return kept


def read_shard_record(cfg: Config, path: Path, identity: dict) -> dict | None:
    """The record of the complete shard at `path`, when it was written from `identity`,
    holds the clouds it records and its list of skipped files is there; else None."""
    try:
        with h5py.File(path, "r") as f:
            record = json.loads(f.attrs["shard"])
            points = f["train/points"]
            ok = (all(record[k] == v for k, v in identity.items())
                  and points.shape == (record["clouds"], cfg.points, 3)
                  and points.dtype == cfg.dtype and f["test/points"].shape[0] == 0)
        listing = path.with_suffix(".skipped.json")
        record["skipped_files"] = json.loads(listing.read_text()) if record["skipped"] else []
        return record if ok and len(record["skipped_files"]) == record["skipped"] else None
    except Exception:  # missing, truncated, or written by something else
        return None


# --------------------------------------------------------------------------------------------


def check_config(cfg: Config) -> None:
    if cfg.labels != "none" and cfg.dtype != "float32":
        raise ConversionError("--dtype float16 is for unlabelled sets: the classification "
                              "loaders read float32")
    if cfg.shard_size and cfg.labels != "none":
        raise ConversionError("--shard-size is for unlabelled sets: the classification loaders "
                              "read one file; leave it out with --labels")
    if cfg.resume and not cfg.shard_size:
        raise ConversionError("--resume continues a sharded conversion: give its --shard-size")
    if cfg.split_files and cfg.labels == "none":
        raise ConversionError("--split-files splits a labelled set: give --labels folders or "
                              "--labels csv")
    if cfg.label_file and cfg.labels != "csv":
        raise ConversionError("--label-file is read with --labels csv")
    if cfg.shard_size < 0 or cfg.points < 1 or cfg.fps_pool < 0:
        raise ConversionError("--shard-size and --fps-pool must be >= 0, --points >= 1")


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    check_config(cfg)
    root, out = Path(cfg.root), Path(cfg.out)
    files = list_files(cfg)
    if not files:
        raise ConversionError(f"--root {cfg.root} holds no files")
    rels = [p.relative_to(root).as_posix() for p in files]
    labels, skip = read_labels(cfg, rels)  # skip: {file index: reason}, files not read
    test: list[bool | None] = [None] * len(files)
    if cfg.split_files:
        test, unlisted = read_splits(cfg, rels)
        skip = {**unlisted, **skip}
    skip = dict(sorted(skip.items()))

    # The output files: shard k holds the usable files of spans[k]; one file holds them all.
    size = cfg.shard_size or len(files)
    spans = [range(s, min(s + size, len(files))) for s in range(0, len(files), size)]
    if cfg.shard_size:
        identities = [shard_identity(cfg, files, rels, span) for span in spans]
        targets = [out / shard_name(k, len(spans)) for k in range(len(spans))]
        records = open_shard_dir(cfg, out, identities)
    else:
        if out.is_dir():
            raise ConversionError(f"--out {out} is a directory: expected the HDF5 file to "
                                  f"write, or --shard-size K for a directory of shards")
        out.parent.mkdir(parents=True, exist_ok=True)
        targets, records = [out], {}
    kept = len(records)
    todo = [k for k in range(len(spans)) if k not in records]
    device = fps_device(cfg)
    work = partial(prepare, cfg, device is None)
    progress = Progress(sum(len(spans[k]) for k in todo))

    # One stream of the files to read, in order: the workers read on while a shard is written.
    tasks = [(i, files[i]) for k in todo for i in spans[k] if i not in skip]
    with Workers(work, min(cfg.workers, len(tasks))) as workers:
        results = workers.map(tasks)
        for k in todo:
            part = gather(cfg, files, spans[k], skip, results, device, progress)
            if not part.clouds and not cfg.shard_size:
                raise ConversionError(f"no usable cloud under {cfg.root}: " + "; ".join(
                    f"{rels[i]}: {why}" for i, why in part.skipped[:5]))
            record = describe(part)
            skipped = [(rels[i], why) for i, why in part.skipped]
            attrs = {}
            if cfg.shard_size:  # its record, for --resume; its skipped files beside it, first
                attrs["shard"] = json.dumps({**identities[k], **record})
                listing = targets[k].with_suffix(".skipped.json")
                listing.unlink(missing_ok=True)
                if skipped:
                    write_json(listing, skipped)
            split = write_part(cfg, targets[k], part, record["stored"], labels, test, attrs)
            records[k] = {**record, "split": split, "skipped_files": skipped}
            if cfg.shard_size:
                print(f"shard {k + 1}/{len(spans)} | {targets[k].name} | {len(spans[k])} files | "
                      f"{record['clouds']} clouds | {len(skipped)} skipped | "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            del part  # free this file's clouds before the next is gathered

    # The summary, the list of skipped files and, for shards, the manifest (last).
    records = [records[k] for k in range(len(spans))]
    clouds = sum(r["clouds"] for r in records)
    skipped = [s for r in records for s in r["skipped_files"]]
    dropped = sum(r["points_dropped"] for r in records)
    if not clouds:
        raise ConversionError(f"no usable cloud under {cfg.root}: "
                              + "; ".join(f"{p}: {w}" for p, w in skipped[:5]))
    listing = out.with_name(out.name + ".skipped.txt")
    if skipped:
        listing.write_text("".join(f"{root / p}\t{w}\n" for p, w in skipped))
    else:
        listing.unlink(missing_ok=True)
    notes = []
    for name in CHANNELS:
        partial_files = [r for r in records if 0 < r["channel_counts"].get(name, 0) < r["clouds"]]
        have = sum(r["channel_counts"][name] for r in partial_files)
        total = sum(r["clouds"] for r in partial_files)
        if partial_files and cfg.shard_size:
            notes.append(f"{name} not stored in {len(partial_files)} of {len(records)} shards: "
                         f"{have} of their {total} clouds had them")
        elif partial_files:
            notes.append(f"{name} not stored: {have} of {total} clouds had them (a channel is "
                         f"stored only when every cloud of the file has it)")
    split = records[0]["split"] if not cfg.shard_size else {"train": clouds}
    if cfg.shard_size:
        write_json(out / MANIFEST, {
            "format_version": SHAPENET55_FORMAT_VERSION, "files": len(files), "clouds": clouds,
            "points": cfg.points, "dtype": cfg.dtype, "skipped": len(skipped),
            "points_dropped": dropped,
            "shards": [{"file": t.name, "files": [s.start, s.stop], "clouds": r["clouds"],
                        "skipped": r["skipped"], "channels": r["stored"]}
                       for t, s, r in zip(targets, spans, records)],
            "config": asdict(cfg)})
        split.update(shards=len(spans), kept=kept)
    seconds = time.perf_counter() - t0
    reasons = Counter(w.split(" (")[0] for _, w in skipped)
    summary = {"files": len(files), "clouds": clouds, "points_dropped": dropped,
               "skipped": len(skipped), "skipped_by_reason": dict(reasons), **split,
               "channels": sorted({n for r in records for n in r["stored"]}, key=CHANNELS.index),
               "channel_notes": notes, "seconds": round(seconds, 2), "out": str(out)}
    print(f"{len(files)} files read, {clouds} clouds written to {out} "
          f"({', '.join(f'{k} {v}' for k, v in split.items())}), {dropped} non-finite points "
          f"dropped, {len(skipped)} skipped{f' (listed in {listing})' if skipped else ''}, "
          f"{seconds:.1f} s ({len(files) / max(seconds, 1e-9):.0f} files/s)")
    for reason, n in reasons.most_common():
        print(f"  skipped {n}: {reason}")
    if summary["channels"]:
        print(f"  channels stored: {', '.join(summary['channels'])}")
    for note in notes:
        print(f"  {note}")
    return summary


if __name__ == "__main__":
    run(Config, main)
