"""ModelNet40 few-shot episodes as HDF5 files that `finetune_cls.py` reads directly.

    # (a) convert the released episodes (Point-BERT's ModelNetFewshot/{way}way_{shot}shot/{fold}.pkl)
    python -m data_prep.modelnet_fewshot convert --root data/ModelNetFewshot --out data/modelnet40_fewshot
    # (b) or generate episodes from the converted ModelNet40 (`python -m data_prep.modelnet40`)
    python -m data_prep.modelnet_fewshot generate --modelnet data/modelnet40.h5 --out data/modelnet40_fewshot

Output: one file per episode, `{out}/{way}way_{shot}shot/{fold}.h5`, in the layout of
`pqae.data.load_modelnet40`: groups `train` and `test`, each with `points` (S, 8192, 3) float32
(xyz only, as stored; the loader unit-sphere normalises over all 8192 points) and
`labels` (S,) int64 = the EPISODE label in 0..way-1, plus `original_labels` (S,) int64 = the
ModelNet40 class id (for inspection; the loader ignores it). Root attributes: format_version,
way, shot, fold, source. So a few-shot fold is a plain `finetune_cls.py --data modelnet40
--data-path {fold}.h5` run with the few-shot recipe; `fewshot.py` runs all of them.

(a) Safety of the released pickles. A pickle can run arbitrary code while it is being loaded,
so the files are never given to `pickle.load`. Each file must first start with a pickle
protocol 2-5 header (b"\\x80" + version byte); it is then read with a restricted Unpickler whose
`find_class` admits ONLY what NumPy array reconstruction needs (ndarray, dtype, NumPy's array
and scalar reconstructors) and refuses every other global, before anything is called. The
content is then validated: a dict with `train` and `test` lists of (points, episode_label,
original_label) tuples, points (8192, >= 3) finite, episode labels 0..way-1 mapped one-to-one
to ModelNet40 classes, `shot` training and `test_per_class` test shapes per class.

(b) Generation (the reference's generator is unseeded; ours is fixed by --seed): episode
(way, shot, fold) uses its own NumPy generator seeded with (seed, way, shot, fold), so each
episode is reproducible on its own and independent of which others are generated. It draws
`way` distinct classes at random (episode label = draw order), then per class `shot` training
shapes from the train split and `test_per_class` (20) test shapes from the test split, each
without replacement, and finally shuffles the training and the test list, as the reference's
generator does.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import h5py
import numpy as np
import tyro

from data_prep.common import read_numpy_pickle
from pqae.data import MODELNET40_CLASSES, MODELNET40_POINTS
from pqae.episodes import FOLDS, SHOTS, TEST_PER_CLASS, WAYS, episode_path, write_episode


# --------------------------------------------------------------------------------------------
# (a) the released pickles

def read_pickle(path: str | Path) -> object:
    """A released episode pickle, loaded without running code (`read_numpy_pickle`)."""
    return read_numpy_pickle(path, "a released few-shot episode file")


def _split_arrays(episode: dict, split: str, path: Path, way: int, shot: int,
                  test_per_class: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (points (S, 8192, 3) float32, episode labels (S,), original labels (S,))."""
    items = episode[split]
    per_class = shot if split == "train" else test_per_class
    where = f"{path} [{split!r}]"
    if not isinstance(items, list) or len(items) != way * per_class:
        raise ValueError(f"{where}: expected a list of {way} x {per_class} = {way * per_class} "
                         f"(points, label, original_label) tuples, found {type(items).__name__} "
                         f"of length {len(items) if hasattr(items, '__len__') else '?'}")
    points, labels, originals = [], [], []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 3):
            raise ValueError(f"{where} item {i}: expected a 3-tuple, found {type(item).__name__}")
        p, label, original = item
        if (not isinstance(p, np.ndarray) or p.ndim != 2 or p.shape[0] != MODELNET40_POINTS
                or p.shape[1] < 3 or not np.issubdtype(p.dtype, np.number)):
            raise ValueError(f"{where} item {i}: expected points ({MODELNET40_POINTS}, >= 3) "
                             f"numeric, found {getattr(p, 'shape', type(p).__name__)}")
        xyz = p[:, :3].astype(np.float32)  # the normals (columns 3..5) are never used
        if not np.isfinite(xyz).all():
            raise ValueError(f"{where} item {i}: points contain NaN or inf")
        # A label may be a Python int, a NumPy integer or a (1,) integer array (.dat caches).
        arrays = [np.asarray(x) for x in (label, original)]
        if any(a.size != 1 or not np.issubdtype(a.dtype, np.integer) for a in arrays):
            raise ValueError(f"{where} item {i}: labels must be single integers, found "
                             f"{label!r}, {original!r}")
        label, original = (int(a.reshape(-1)[0]) for a in arrays)
        if not (0 <= label < way and 0 <= original < MODELNET40_CLASSES):
            raise ValueError(f"{where} item {i}: episode label {label} not in 0..{way - 1} or "
                             f"ModelNet40 label {original} not in 0..{MODELNET40_CLASSES - 1}")
        points.append(xyz)
        labels.append(label)
        originals.append(original)
    labels, originals = np.array(labels, np.int64), np.array(originals, np.int64)
    counts = np.bincount(labels, minlength=way)
    if (counts != per_class).any():
        raise ValueError(f"{where}: expected {per_class} shapes per episode label, found counts "
                         f"{counts.tolist()}")
    return np.stack(points), labels, originals


def read_episode(path: str | Path, way: int, shot: int, test_per_class: int = TEST_PER_CLASS
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A released episode pickle, loaded safely and validated: split -> (points, labels,
    original_labels)."""
    path = Path(path)
    episode = read_pickle(path)
    if not isinstance(episode, dict) or not {"train", "test"} <= episode.keys():
        raise ValueError(f"{path}: expected a dict with keys 'train' and 'test', found "
                         f"{sorted(episode) if isinstance(episode, dict) else type(episode).__name__}")
    out = {s: _split_arrays(episode, s, path, way, shot, test_per_class) for s in ("train", "test")}
    pairs = {(int(a), int(b)) for s in out.values() for a, b in zip(s[1], s[2])}
    if len(pairs) != way or len({b for _, b in pairs}) != way:
        raise ValueError(f"{path}: episode labels must map one-to-one to {way} ModelNet40 "
                         f"classes, found (episode, original) pairs {sorted(pairs)}")
    return out


# --------------------------------------------------------------------------------------------
# (b) generation from the converted ModelNet40


def draw_episode(train_labels: np.ndarray, test_labels: np.ndarray, way: int, shot: int,
                 fold: int, seed: int = 0, test_per_class: int = TEST_PER_CLASS
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Indices of one episode into the ModelNet40 splits: split -> (indices (S,), episode
    labels (S,)), both lists shuffled. A pure function of (labels, way, shot, fold, seed)."""
    rng = np.random.default_rng([seed, way, shot, fold])
    classes = rng.permutation(MODELNET40_CLASSES)[:way]  # episode label i = classes[i]
    out = {}
    for split, labels, k in (("train", train_labels, shot), ("test", test_labels, test_per_class)):
        idx, ep = [], []
        for i, c in enumerate(classes):
            members = np.flatnonzero(labels == c)
            if len(members) < k:
                raise ValueError(f"class {c} has {len(members)} {split} shapes, fewer than {k}")
            idx.append(rng.permutation(members)[:k])
            ep.append(np.full(k, i, np.int64))
        order = rng.permutation(way * k)
        out[split] = (np.concatenate(idx)[order], np.concatenate(ep)[order])
    return out


def generate(modelnet: Path, out: Path, ways=WAYS, shots=SHOTS, folds=FOLDS, seed: int = 0,
             test_per_class: int = TEST_PER_CLASS) -> list[Path]:
    """Write the episodes drawn from a converted ModelNet40 HDF5 (train/test points+labels)."""
    with h5py.File(modelnet, "r") as f:
        labels = {s: f[f"{s}/labels"][()].astype(np.int64) for s in ("train", "test")}
        written = []
        for way in ways:
            for shot in shots:
                for fold in folds:
                    draw = draw_episode(labels["train"], labels["test"], way, shot, fold, seed,
                                        test_per_class)
                    splits = {}
                    for split, (idx, ep) in draw.items():  # points (S, N, >= 3) as converted
                        order = np.argsort(idx)  # h5py reads increasing indices only
                        pts = np.empty((len(idx), MODELNET40_POINTS, 3), np.float32)
                        pts[order] = f[f"{split}/points"][idx[order]][:, :, :3]
                        splits[split] = (pts, ep, labels[split][idx])
                    path = episode_path(out, way, shot, fold)
                    write_episode(path, splits, way, shot, fold,
                                  f"generated from {modelnet} with seed {seed}")
                    written.append(path)
    print(f"wrote {len(written)} episodes under {out} (seed {seed})")
    return written


def convert(root: Path, out: Path, ways=WAYS, shots=SHOTS, folds=FOLDS,
            test_per_class: int = TEST_PER_CLASS) -> list[Path]:
    """Validate and convert the released `{way}way_{shot}shot/{fold}.pkl` files. Nothing is
    written unless every episode passes: they are staged in a temporary directory and moved
    into `out` at the end."""
    out = Path(out)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staged = []
    try:
        for way in ways:
            for shot in shots:
                for fold in folds:
                    src = episode_path(root, way, shot, fold, ".pkl")
                    if not src.is_file():
                        raise FileNotFoundError(f"{src} not found (expected the released "
                                                f"few-shot episodes under {root})")
                    splits = read_episode(src, way, shot, test_per_class)
                    tmp = episode_path(staging, way, shot, fold)
                    write_episode(tmp, splits, way, shot, fold, f"converted from {src}")
                    staged.append((tmp, episode_path(out, way, shot, fold)))
        for tmp, path in staged:  # every episode passed
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = [path for _, path in staged]
    print(f"converted {len(written)} episodes from {root} into {out}")
    return written


@dataclass(frozen=True)
class Convert:
    """Validate and convert the released few-shot pickles."""
    root: Path
    """The directory holding `{way}way_{shot}shot/{fold}.pkl`."""
    out: Path = Path("data/modelnet40_fewshot")
    """Output directory of the `{way}way_{shot}shot/{fold}.h5` files."""
    ways: tuple[int, ...] = WAYS
    """the N of the N-way settings to convert."""
    shots: tuple[int, ...] = SHOTS
    """the K of the K-shot settings to convert."""
    folds: tuple[int, ...] = FOLDS
    """the folds (episodes) to convert."""
    test_per_class: int = TEST_PER_CLASS
    """test shapes per class expected in each file (20 in the release)."""


@dataclass(frozen=True)
class Generate:
    """Generate episodes from the converted ModelNet40 with a fixed seed."""
    modelnet: Path = Path("data/modelnet40.h5")
    """The HDF5 written by `python -m data_prep.modelnet40`."""
    out: Path = Path("data/modelnet40_fewshot")
    """Output directory of the `{way}way_{shot}shot/{fold}.h5` files."""
    seed: int = 0
    """episode (way, shot, fold) is drawn from a generator seeded with (seed, way, shot, fold)."""
    ways: tuple[int, ...] = WAYS
    """the N of the N-way settings to generate."""
    shots: tuple[int, ...] = SHOTS
    """the K of the K-shot settings to generate."""
    folds: tuple[int, ...] = FOLDS
    """the folds (episodes) to generate."""
    test_per_class: int = TEST_PER_CLASS
    """test shapes per class (20 in the reference)."""


def main(cmd: Convert | Generate) -> list[Path]:
    if isinstance(cmd, Convert):
        return convert(cmd.root, cmd.out, cmd.ways, cmd.shots, cmd.folds, cmd.test_per_class)
    return generate(cmd.modelnet, cmd.out, cmd.ways, cmd.shots, cmd.folds, cmd.seed,
                    cmd.test_per_class)


if __name__ == "__main__":
    main(tyro.cli(Union[Convert, Generate]))  # subcommands `convert` and `generate`
