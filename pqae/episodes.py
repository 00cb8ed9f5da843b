"""ModelNet40 few-shot episodes: where they live and how one is written, for fewshot.py and the
converters of `data_prep.modelnet_fewshot`.

An episode `{root}/{way}way_{shot}shot/{fold}.h5` is in the layout of
`pqae.data.load_modelnet40`: groups `train` and `test`, each with `points` (S, 8192, 3) float32
and `labels` (S,) int64 = the EPISODE label in 0..way-1, plus `original_labels` (S,) int64 =
the ModelNet40 class id (for inspection; the loader ignores it). Root attributes:
format_version, way, shot, fold, source.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pqae import data
from pqae.data import CLS_FORMAT_VERSION, MODELNET40_POINTS
from pqae.log import atomic_output

WAYS, SHOTS, FOLDS = (5, 10), (10, 20), tuple(range(10))
TEST_PER_CLASS = 20


def episode_name(way: int, shot: int) -> str:
    return f"{way}way_{shot}shot"


def episode_path(root: str | Path, way: int, shot: int, fold: int, suffix: str = ".h5") -> Path:
    return Path(root) / episode_name(way, shot) / f"{fold}{suffix}"


def write_episode(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  way: int, shot: int, fold: int, source: str) -> None:
    """Write one episode in the `load_modelnet40` layout, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format_version=CLS_FORMAT_VERSION, way=way, shot=shot, fold=fold,
                           source=source)
            for split, (points, labels, originals) in splits.items():
                f.create_dataset(f"{split}/points", data=points)
                f.create_dataset(f"{split}/labels", data=labels)
                f.create_dataset(f"{split}/original_labels", data=originals)


def procedural_episode(root: str | Path, way: int, shot: int, fold: int,
                       test_per_class: int = 4) -> Path:
    """A toy episode from the built-in procedural classes (way <= 5; the class is the primitive
    kind), `shot` train and `test_per_class` test shapes per class at 8192 points, seeded by
    the fold: for smoke runs of fewshot.py without ModelNet40."""
    n, n_train = way * (shot + test_per_class), way * shot
    points, labels = data.procedural_classes(n, MODELNET40_POINTS, num_classes=way, seed=fold)
    points, labels = points.numpy(), labels.numpy()  # labels i % way: balanced in both splits
    split = {"train": slice(0, n_train), "test": slice(n_train, n)}
    path = episode_path(root, way, shot, fold)
    write_episode(path, {k: (points[s], labels[s], labels[s]) for k, s in split.items()},
                  way, shot, fold, "procedural")
    return path
