"""data_prep.folder: a user's own folder of point clouds into the files the scripts read as
they are; bad files skipped with their reason, nothing partial written."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

import finetune_cls
import pretrain
from conftest import small_pretrain_config
from data_prep import folder
from data_prep.common import ConversionError
from pqae import data


def cloud(n: int, seed: int, kind: str = "ball") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    if kind == "ball":
        return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.5, 1.0)
    return np.clip(x, -1, 1) * np.array([1.0, 0.3, 0.3])  # a flat box


def write_tree(root):
    """Every native format, plus the files a real folder holds that are not clouds."""
    root.mkdir()
    np.save(root / "a.npy", cloud(300, 0))
    np.savez(root / "b.npz", points=cloud(200, 1), normals=np.zeros((200, 3)))
    (root / "sub").mkdir()
    rows = cloud(150, 2)
    (root / "sub" / "c.txt").write_text("x y z\n" + "\n".join(" ".join(map(str, r)) for r in rows))
    bad = cloud(120, 3)
    bad[:7, 1] = np.nan  # 7 rows dropped, the cloud kept
    (root / "sub" / "d.csv").write_text("\n".join(",".join(map(str, r)) for r in bad))
    np.savetxt(root / "e.xyz", cloud(100, 4)[:10])  # 10 points: too few
    (root / "notes.md").write_text("not a cloud")  # unknown extension
    (root / "f.npy").write_bytes(b"garbage")  # unreadable
    (root / "g.ply").write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n"
                                "property float y\nproperty float z\nend_header\n0 0 0\n1 1 1\n")


def test_a_folder_becomes_pretraining_data(tmp_path):
    write_tree(tmp_path / "scans")
    out = tmp_path / "scans.h5"
    summary = folder.main(folder.Config(root=tmp_path / "scans", out=out, min_points=64))
    assert summary["files"] == 8 and summary["clouds"] == 4 and summary["points_dropped"] == 7
    assert summary["skipped"] == 4
    listing = (tmp_path / "scans.h5.skipped.txt").read_text()
    assert "e.xyz\t10 finite points, fewer than --min-points 64" in listing
    assert "notes.md\tunknown extension .md" in listing
    assert "f.npy\tunreadable (" in listing
    assert "g.ply\t" in listing  # too few points, or no plyfile: either way a reason
    points = data.load_shapenet55(out, "all")  # the pretraining loader reads it as it is
    assert points.shape == (4, data.SHAPENET55_POINTS, 3)
    a = np.load(tmp_path / "scans" / "a.npy").astype(np.float32)
    # a cloud smaller than --points keeps every point once, the rest are its duplicates
    assert {tuple(p) for p in points[0].numpy()} == {tuple(p) for p in a}
    result = pretrain.main(small_pretrain_config(tmp_path, data="shapenet55", data_path=str(out),
                                                 batch_size=4, max_steps=2))
    assert result["step"] == 2 and np.isfinite(result["history"][-1]["loss"])
    # any point count, stored float16: half the file, read back widened
    half = tmp_path / "half.h5"
    folder.main(folder.Config(root=tmp_path / "scans", out=half, points=512, dtype="float16"))
    with h5py.File(half) as f:
        assert f["train/points"].dtype == np.float16 and f["train/points"].shape == (4, 512, 3)
        stored = torch.from_numpy(f["train/points"][()])
    loaded = data.load_shapenet55(half, "all")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, stored.float())
    result = pretrain.main(small_pretrain_config(tmp_path / "b", data="shapenet55",
                                                 data_path=str(half), batch_size=4, max_steps=1))
    assert result["step"] == 1


def test_fps_keeps_input_points_spread_out(tmp_path):
    (tmp_path / "in").mkdir()
    big = cloud(2000, 5)
    np.save(tmp_path / "in" / "big.npy", big)
    for how in ("fps", "random"):
        out = tmp_path / f"{how}.h5"
        folder.main(folder.Config(root=tmp_path / "in", out=out, points=256, sample=how))
        with h5py.File(out) as f:
            picked = f["train/points"][0]
        assert len({tuple(p) for p in picked}) == 256  # distinct input points
        assert np.isin(picked.view([("", picked.dtype)] * 3),
                       big.astype(np.float32).view([("", np.float32)] * 3)).all()
        d = torch.cdist(torch.from_numpy(picked), torch.from_numpy(picked))
        spread = d.fill_diagonal_(float("inf")).min().item()
        if how == "fps":
            fps_spread = spread
    assert fps_spread > 2 * spread  # FPS spreads its picks; a random subset has close pairs


def test_class_folders_become_classification_data(tmp_path):
    root = tmp_path / "objects"
    for k, kind in enumerate(("ball", "box")):
        (root / kind).mkdir(parents=True)
        for i in range(6):
            np.save(root / kind / f"{i}.npy", cloud(400, 10 * k + i, kind))
    out = tmp_path / "objects.h5"
    summary = folder.main(folder.Config(root=root, out=out, labels="folders", test_fraction=0.34))
    assert summary["train"] == 8 and summary["test"] == 4 and summary["classes"] == 2
    with h5py.File(out) as f:
        assert list(f.attrs["classes"]) == ["ball", "box"]
        assert sorted(f["test/labels"][()].tolist()) == [0, 0, 1, 1]
    cfg = dataclasses.replace(finetune_cls.PRESETS["tiny"], data="modelnet40", data_path=str(out),
                              num_classes=2, batch_size=4, epochs=1, votes=0, device="cpu",
                              out_dir=str(tmp_path / "run"), num_points=256)
    result = finetune_cls.main(cfg)
    assert result["step"] == 4 and result["test_samples"] == 4
    # a file directly under --root has no class
    np.save(root / "loose.npy", cloud(400, 99))
    with pytest.raises(ConversionError, match="loose.npy: with --labels folders"):
        folder.main(folder.Config(root=root, out=tmp_path / "x.h5", labels="folders"))


def test_strict_stops_at_the_first_bad_file_and_writes_nothing(tmp_path):
    write_tree(tmp_path / "scans")
    with pytest.raises(ConversionError, match=r"e\.xyz: 10 finite points.*--strict"):
        folder.main(folder.Config(root=tmp_path / "scans", out=tmp_path / "o.h5", strict=True))
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob("o.h5*"))


def test_ply_files_through_the_io_extra(tmp_path, monkeypatch):
    """Binary (both endiannesses) and ASCII .ply through plyfile, the [io] extra; without
    it, a .ply is skipped with the command that installs it."""
    plyfile = pytest.importorskip("plyfile")
    root = tmp_path / "plys"
    root.mkdir()
    pts = cloud(300, 7).astype(np.float32)
    vertex = np.array([tuple(p) for p in pts], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    for name, text, order in (("le", False, "<"), ("be", False, ">"), ("ascii", True, "=")):
        plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex")], text=text,
                        byte_order=order).write(str(root / f"{name}.ply"))
    summary = folder.main(folder.Config(root=root, out=tmp_path / "p.h5", points=300))
    assert summary["clouds"] == 3 and summary["skipped"] == 0
    with h5py.File(tmp_path / "p.h5") as f:
        for got in f["train/points"][()]:
            assert {tuple(p) for p in got} == {tuple(p) for p in pts}
    import builtins
    real_import = builtins.__import__

    def no_plyfile(name, *args, **kwargs):
        if name == "plyfile":
            raise ImportError("no plyfile")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plyfile)
    with pytest.raises(ConversionError, match=r'a \.ply file needs the plyfile package: pip '
                                              r'install -e "\.\[io\]"'):
        folder.main(folder.Config(root=root, out=tmp_path / "q.h5"))


def test_point_cloud_and_mesh_formats_through_the_io_extra(tmp_path):
    """.pcd in its three encodings (pypcd4), .las (laspy), and meshes .off / .obj / .stl /
    .glb (trimesh), sampled on the surface, area-weighted: the points lie on the mesh, and a
    face twice as large gets about twice the points."""
    pypcd4 = pytest.importorskip("pypcd4")
    laspy = pytest.importorskip("laspy")
    trimesh = pytest.importorskip("trimesh")
    root = tmp_path / "io"
    root.mkdir()
    pts = cloud(300, 8).astype(np.float32)
    for enc in ("ascii", "binary", "binary_compressed"):
        pc = pypcd4.PointCloud.from_xyz_points(pts)
        pc.save(root / f"{enc}.pcd", encoding=getattr(pypcd4.Encoding, enc.upper()))
    las = laspy.create(point_format=0, file_version="1.2")
    las.header.scales = np.array([1e-4, 1e-4, 1e-4])
    las.header.offsets = np.zeros(3)
    las.x, las.y, las.z = pts[:, 0], pts[:, 1], pts[:, 2]
    las.write(str(root / "scan.las"))
    summary = folder.main(folder.Config(root=root, out=tmp_path / "pc.h5", points=300))
    assert summary["clouds"] == 4 and summary["skipped"] == 0
    with h5py.File(tmp_path / "pc.h5") as f:
        got = f["train/points"][()]
    def nearest(a, b):  # the largest distance from a point of a to the nearest of b
        d = torch.cdist(torch.from_numpy(a).double(), torch.from_numpy(b).double(),
                        compute_mode="donot_use_mm_for_euclid_dist")
        return d.min(1).values.max().item()

    # files in name order: ascii.pcd (printed digits), binary.pcd, binary_compressed.pcd
    # (the very floats), scan.las (coordinates stored at a 1e-4 scale)
    for k, tol in ((0, 1e-6), (1, 0.0), (2, 0.0), (3, 1e-4)):
        assert nearest(got[k], pts) <= tol and nearest(pts, got[k]) <= tol, k

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    # two triangles in the plane z = 0: the first twice the area of the second
    v = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [3, 0, 0], [5, 0, 0], [3, 1, 0]], float)
    mesh = trimesh.Trimesh(vertices=v, faces=[[0, 1, 2], [3, 4, 5]], process=False)
    for ext in (".off", ".obj", ".stl", ".glb"):
        mesh.export(str(meshes / f"m{ext}"))
    summary = folder.main(folder.Config(root=meshes, out=tmp_path / "m.h5", points=3000))
    assert summary["clouds"] == 4 and summary["skipped"] == 0
    with h5py.File(tmp_path / "m.h5") as f:
        for got in f["train/points"][()]:
            got = got[:, [0, 1, 2]] if abs(got[:, 2]).max() < 1e-6 else got[:, [0, 2, 1]]
            assert abs(got[:, 2]).max() < 1e-5  # on the plane (glTF may swap y and z)
            first = (got[:, 0] <= 2.0001).mean()  # the big triangle spans x in [0, 2]
            assert 0.6 < first < 0.73, first  # area 2 of 3: ~0.667

