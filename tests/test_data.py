"""Data layer: ShapeNet-55 converter and loader, airplane slice, procedural corpus, sampling."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_prep import shapenet55
from pqae.data import (
    check_finite,
    load_airplanes,
    load_shapenet55,
    procedural_shapes,
    rotate_y,
    sample_points,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
AIRPLANES = SHARED_DATA / "modelnet40_airplanes" / "airplanes_2048.npz"


# --------------------------------------------------------------------------------------------
# ShapeNet-55 converter and loader


def make_tree(root: Path, train: int = 3, test: int = 2, seed: int = 0) -> dict[str, dict]:
    """A fake ShapeNet55-34 tree in the official layout; returns {split: {name: cloud}}."""
    rng = np.random.default_rng(seed)
    (root / "shapenet_pc").mkdir(parents=True)
    (root / "ShapeNet-55").mkdir()
    splits = {}
    for split, count in (("train", train), ("test", test)):
        clouds = {}
        for i in range(count):
            name = f"0{2691156 + i}-{split}model{i:03d}.npy"
            cloud = rng.standard_normal((8192, 3)).astype(np.float32)
            np.save(root / "shapenet_pc" / name, cloud)
            clouds[name] = cloud
        (root / "ShapeNet-55" / f"{split}.txt").write_text("\n".join(clouds) + "\n")
        splits[split] = clouds
    return splits


def convert(root: Path, out: Path, **kw) -> Path:
    return shapenet55.main(shapenet55.Config(root=root, out=out, **kw))


def test_shapenet55_roundtrip(tmp_path):
    splits = make_tree(tmp_path / "ShapeNet55-34")
    out = convert(tmp_path / "ShapeNet55-34", tmp_path / "s55.h5")
    assert out == tmp_path / "s55.h5"
    assert not (tmp_path / "s55.h5.tmp").exists()

    expected = {s: np.stack(list(c.values())) for s, c in splits.items()}
    for split in ("train", "test"):
        got = load_shapenet55(out, split)
        assert got.dtype == torch.float32 and got.shape == (len(splits[split]), 8192, 3)
        np.testing.assert_array_equal(got.numpy(), expected[split])
    # "all" is test followed by train, as the reference's --whole reads them.
    every = load_shapenet55(out)
    test_then_train = np.concatenate([expected["test"], expected["train"]])
    np.testing.assert_array_equal(every.numpy(), test_then_train)

    with h5py.File(out, "r") as f:
        for split in ("train", "test"):
            names = [n.decode() for n in f[f"{split}/names"][:]]
            assert names == list(splits[split])
            taxonomy = [t.decode() for t in f[f"{split}/taxonomy"][:]]
            assert taxonomy == [n.split("-")[0] for n in names]
            assert f[f"{split}/points"].chunks == (1, 8192, 3)
        assert (f.attrs["num_train"], f.attrs["num_test"]) == (3, 2)
        assert f.attrs["format_version"] == 1


def test_shapenet55_limit(tmp_path):
    make_tree(tmp_path / "root", train=4, test=3)
    out = convert(tmp_path / "root", tmp_path / "s55.h5", limit=2)
    assert load_shapenet55(out, "train").shape[0] == 2
    assert load_shapenet55(out, "test").shape[0] == 2


def test_shapenet55_converter_reports_every_bad_file(tmp_path):
    root = tmp_path / "root"
    splits = make_tree(root, train=4, test=2)
    train = list(splits["train"])
    (root / "shapenet_pc" / train[0]).unlink()  # missing
    np.save(root / "shapenet_pc" / train[1], np.zeros((8000, 3), np.float32))  # wrong shape
    nan = splits["test"][next(iter(splits["test"]))].copy()
    nan[17, 1] = np.nan
    np.save(root / "shapenet_pc" / next(iter(splits["test"])), nan)  # non-finite
    (root / "shapenet_pc" / train[2]).write_bytes(b"not a npy file")  # unreadable

    out = tmp_path / "s55.h5"
    with pytest.raises(shapenet55.ConversionError) as e:
        convert(root, out)
    msg = str(e.value)
    for name in (train[0], train[1], train[2], next(iter(splits["test"]))):
        assert name in msg
    assert train[3] not in msg  # the good one is not blamed
    assert "missing" in msg and "(8000, 3)" in msg and "NaN" in msg and "unreadable" in msg
    assert not out.exists() and not (tmp_path / "s55.h5.tmp").exists()


def test_shapenet55_cli_exits_nonzero(tmp_path):
    root = tmp_path / "root"
    splits = make_tree(root, train=1, test=1)
    bad = next(iter(splits["train"]))
    (root / "shapenet_pc" / bad).unlink()
    out = tmp_path / "s55.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.shapenet55", "--root", str(root), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert bad in proc.stderr
    assert not out.exists()


def test_load_shapenet55_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError) as e:
        load_shapenet55(path)
    assert str(path) in str(e.value) and "python -m data_prep.shapenet55" in str(e.value)


def test_load_shapenet55_wrong_layout(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/points", data=np.zeros((2, 1024, 2), np.float32))
        f.create_dataset("test/points", data=np.zeros((2, 8192, 3), np.float64))
    with pytest.raises(ValueError, match=r"bad\.h5.*\(S, N, 3\).*\(2, 1024, 2\)"):
        load_shapenet55(path, "train")
    with pytest.raises(ValueError, match=r"bad\.h5.*float64"):
        load_shapenet55(path, "test")
    # any N, float16 or float32, but one N for both groups
    rng = np.random.default_rng(0)
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/points", data=rng.standard_normal((2, 1024, 3)).astype(np.float16))
        f.create_dataset("test/points", data=rng.standard_normal((1, 512, 3)).astype(np.float32))
    train = load_shapenet55(path, "train")
    assert train.shape == (2, 1024, 3) and train.dtype == torch.float32
    with pytest.raises(ValueError, match=r"found 'train/points' with shape \(2, 1024, 3\).*"
                                         r"the other group has N = 512"):
        load_shapenet55(path, "all")

    path = tmp_path / "nokey.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/points", data=np.zeros((2, 8192, 3), np.float32))
    with pytest.raises(ValueError, match=r"nokey\.h5.*'test/points'"):
        load_shapenet55(path, "all")
    with pytest.raises(ValueError, match="split"):
        load_shapenet55(path, "val")


def test_load_shapenet55_nan(tmp_path):
    path = tmp_path / "nan.h5"
    pts = np.random.default_rng(0).standard_normal((4, 8192, 3)).astype(np.float32)
    pts[2, 5, 0] = np.inf
    with h5py.File(path, "w") as f:
        f.create_dataset("train/points", data=pts[:3])
        f.create_dataset("test/points", data=pts[3:])
    with pytest.raises(ValueError, match=r"nan\.h5 'train/points'.*NaN or inf values in "
                                         r"sample\(s\) 2$"):
        load_shapenet55(path, "train")
    # "all" reads test first; the index is still the one within 'train', as the file has it
    with pytest.raises(ValueError, match=r"'train/points'.*sample\(s\) 2$"):
        load_shapenet55(path, "all")


def test_check_finite():
    x = torch.zeros(5, 4, 3)
    check_finite(x, "ok")
    x[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"my batch.*sample 3\b"):
        check_finite(x, "my batch")


# --------------------------------------------------------------------------------------------
# ModelNet40 airplane slice (real data)


@pytest.mark.skipif(not AIRPLANES.is_file(), reason=f"shared data slice absent: {AIRPLANES}")
def test_airplanes_real_slice():
    every = load_airplanes(AIRPLANES)
    train, test = load_airplanes(AIRPLANES, "train"), load_airplanes(AIRPLANES, "test")
    assert every.shape == (717, 2048, 3) and every.dtype == torch.float32
    assert train.shape == (618, 2048, 3) and test.shape == (99, 2048, 3)
    is_test = torch.from_numpy(np.load(AIRPLANES)["is_test"])
    assert torch.equal(test, every[is_test]) and torch.equal(train, every[~is_test])


def test_airplanes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_airplanes(tmp_path / "nope.npz")
    path = tmp_path / "bad.npz"
    np.savez(path, points=np.zeros((4, 1024, 3), np.float32), is_test=np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"bad\.npz.*\(4, 1024, 3\)"):
        load_airplanes(path)
    path = tmp_path / "nokey.npz"
    np.savez(path, points=np.zeros((4, 2048, 3), np.float32))
    with pytest.raises(ValueError, match=r"nokey\.npz.*is_test"):
        load_airplanes(path)
    path = tmp_path / "nan.npz"
    pts = np.random.default_rng(0).standard_normal((4, 2048, 3)).astype(np.float32)
    pts[1, 0, 0] = np.nan
    np.savez(path, points=pts, is_test=np.array([True, False, False, True]))
    with pytest.raises(ValueError, match=r"nan\.npz 'points'.*NaN or inf values in sample\(s\) 1$"):
        load_airplanes(path, "train")  # the index in the file, not in the train split


# --------------------------------------------------------------------------------------------
# Procedural corpus


def test_procedural_shapes():
    a = procedural_shapes(256, 512, seed=0)
    assert a.shape == (256, 512, 3) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, procedural_shapes(256, 512, seed=0))  # deterministic
    assert not torch.allclose(a, procedural_shapes(256, 512, seed=1))
    # Unit sphere, and a real 3-D extent on every shape (nothing collapsed to a line).
    assert torch.allclose(a.norm(dim=2).amax(dim=1), torch.ones(256), atol=1e-5)
    assert a.mean(dim=1).abs().max() < 1e-5
    assert (a.amax(dim=1) - a.amin(dim=1)).min() > 0.1
    # Shapes differ from each other: sorted point norms are a rotation-invariant signature.
    sig = a.norm(dim=2).sort(dim=1).values  # (S, N)
    dist = torch.cdist(sig, sig) + torch.eye(256) * 1e9
    assert dist.min() > 1e-2
    # The points within a cloud are distinct (a surface, not a few repeated points).
    assert all(torch.unique(c, dim=0).shape[0] == 512 for c in a[:8])
    # The global RNG is not consumed (a private generator is used).
    torch.manual_seed(5)
    procedural_shapes(4, 64)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_procedural_shapes_full_size_is_fast():
    import time

    t0 = time.perf_counter()
    x = procedural_shapes()
    assert x.shape == (1024, 2048, 3)
    assert time.perf_counter() - t0 < 5.0  # well under a second on a laptop CPU


# --------------------------------------------------------------------------------------------
# Per-step sampling and rotation


def test_sample_points():
    g = torch.Generator().manual_seed(0)
    clouds = torch.randn(6, 300, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    idx = torch.tensor([4, 0, 4, 2])
    torch.manual_seed(0)
    out = sample_points(clouds, idx, 100)
    assert out.shape == (4, 100, 3)
    assert out.mean(dim=1).abs().max() < 1e-5
    assert torch.allclose(out.norm(dim=2).amax(dim=1), torch.ones(4))
    assert not torch.equal(out[0], out[2])  # independent draws for repeated indices

    for b, i in enumerate(idx.tolist()):
        # Every output point is a distinct point of cloud i (without replacement) ...
        src = _source_frame(out[b], clouds[i])
        assert src is not None
        d = torch.cdist(out[b].double(), src)  # (100, 300)
        assert d.min(dim=1).values.max() < 1e-4
        assert d.argmin(dim=1).unique().numel() == 100
        # ... and no other cloud can explain it.
        assert all(_source_frame(out[b], clouds[j]) is None for j in range(6) if j != i)

    torch.manual_seed(0)
    assert torch.equal(out, sample_points(clouds, idx, 100))  # the global RNG controls it
    with pytest.raises(ValueError, match="exceeds"):
        sample_points(clouds, idx, 301)


def _source_frame(sample: torch.Tensor, cloud: torch.Tensor) -> torch.Tensor | None:
    """Cloud (N, 3) mapped by the normalisation p -> (p - c) / s that produced sample (K, 3)
    from a subset of it, or None if no subset of cloud can have produced it.

    c and s follow from which cloud points sample[0] and sample[1] came from: try all pairs
    (k, m), fit s from p_m - p_k = s (a1 - a0), keep the pair that fits exactly.
    """
    p, a = cloud.double(), sample.double()
    step = a[1] - a[0]  # (3,)
    diff = p[None, :] - p[:, None]  # (N, N, 3): p_m - p_k
    s = diff @ step / step.dot(step)  # (N, N)
    err = (diff - s[..., None] * step).norm(dim=2) + (s <= 0) * 1e9
    k, m = divmod(int(err.argmin()), p.shape[0])
    if err[k, m] > 1e-4:
        return None
    c = p[k] - s[k, m] * a[0]
    mapped = (p - c) / s[k, m]
    if torch.cdist(a, mapped).min(dim=1).values.max() > 1e-4:
        return None
    return mapped


def test_sample_points_full_permutation():
    clouds = torch.randn(2, 50, 3)
    torch.manual_seed(1)
    out = sample_points(clouds, torch.tensor([1]), 50)
    src = clouds[1] - clouds[1].mean(0)
    src = src / src.norm(dim=1).max()
    # Same multiset of points (normalisation over all N is the whole-cloud one), new order.
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    assert torch.allclose(key(out[0]), key(src), atol=1e-6)
    assert not torch.allclose(out[0], src)


def test_rotate_y():
    pts = torch.tensor([[[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [3.0, 0.5, -2.0]]])  # (1, 3, 3)
    a = torch.tensor([math.pi / 2])
    out = rotate_y(pts, a)
    # (x, y, z) -> (x cos a - z sin a, y, x sin a + z cos a) with cos = 0, sin = 1
    expected = torch.tensor([[[0.0, 2.0, 1.0], [-1.0, -1.0, 0.0], [2.0, 0.5, 3.0]]])
    assert torch.allclose(out, expected, atol=1e-6)

    x = torch.randn(4, 100, 3)
    angles = torch.rand(4) * 2 * math.pi
    before = x.clone()
    y = rotate_y(x, angles)
    assert torch.equal(x, before)  # not in place
    assert torch.allclose(y.norm(dim=2), x.norm(dim=2), atol=1e-5)
    assert torch.equal(y[..., 1], x[..., 1])
    # Row-vector convention: points @ [[c,0,s],[0,1,0],[-s,0,c]].
    c, s = angles.cos(), angles.sin()
    z, o = torch.zeros(4), torch.ones(4)
    mat = torch.stack([c, z, s, z, o, z, -s, z, c], dim=1).view(4, 3, 3)
    assert torch.allclose(y, x @ mat, atol=1e-5)
