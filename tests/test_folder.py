"""data_prep.folder: a user's own folder of point clouds into the files the scripts read as
they are; bad files skipped with their reason, nothing partial written."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import struct

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
    # b.npz has normals, the others no channel: not stored, and said so
    assert summary["channels"] == [] and summary["channel_notes"] == [
        "normals not stored: 1 of 4 clouds had them (a channel is stored only when every "
        "cloud of the file has it)"]
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
        assert f["train/points"].chunks is None and f.attrs["checked_finite"]  # contiguous
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
    # a small object at the origin (2 cm across, in metres): FPS picks from a unit-sphere copy,
    # else the kernels' rule (nothing within ~0.03 of the origin) would repeat one point
    np.save(tmp_path / "in" / "big.npy", big * 0.01)
    folder.main(folder.Config(root=tmp_path / "in", out=tmp_path / "small.h5", points=256))
    with h5py.File(tmp_path / "small.h5") as f:
        assert len({tuple(p) for p in f["train/points"][0]}) == 256


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

    monkeypatch.setattr(builtins, "__import__", no_plyfile)  # in this process: --workers 1
    with pytest.raises(ConversionError, match=r'a \.ply file needs the plyfile package: pip '
                                              r'install -e "\.\[io\]"'):
        folder.main(folder.Config(root=root, out=tmp_path / "q.h5", workers=1))


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



# --------------------------------------------------------------------------------------------
# Per-point channels, files written by hand, corrupt files


def channel_source(n: int = 200):
    """Unique points on a 1/1024 grid (exact in float32, float64 and a LAS at that scale)
    with a colour, a normal and an intensity each."""
    rng = np.random.default_rng(3)
    pts = (rng.permutation(4096 ** 2)[:n, None] // 4096 ** np.arange(3)[::-1] % 4096 - 2048)
    pts = (pts / 1024).astype(np.float32)
    assert len(np.unique(pts, axis=0)) == n
    colors = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    normals = rng.standard_normal((n, 3)).astype(np.float32)
    intensity = rng.integers(0, 1000, n).astype(np.float32)
    return pts, colors, normals, intensity


def hand_written_ply(path, order: str, pts, colors, normals, intensity) -> None:
    """A binary PLY written byte by byte: float x y z nx ny nz, uchar red green blue, float
    intensity, in `order` ("<" little-endian, ">" big-endian)."""
    names = ["x", "y", "z", "nx", "ny", "nz"]
    header = (f"ply\nformat binary_{'little' if order == '<' else 'big'}_endian 1.0\n"
              f"element vertex {len(pts)}\n" + "".join(f"property float {c}\n" for c in names)
              + "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              "property float intensity\nend_header\n")
    body = b"".join(struct.pack(order + "6f3Bf", *p, *n, *c, i)
                    for p, n, c, i in zip(pts, normals, colors, intensity))
    path.write_bytes(header.encode() + body)


def lzf_literals(data: bytes) -> bytes:
    """LZF without back-references: runs of at most 32 bytes, each after a control byte
    holding its length - 1. Valid LZF that any decoder reads."""
    return b"".join(bytes([len(run) - 1]) + run for run in
                    (data[i:i + 32] for i in range(0, len(data), 32)))


def hand_written_pcd(path, pts, colors, normals, intensity) -> None:
    """A binary_compressed PCD written byte by byte: the fields one after the other, x then
    y then ..., LZF-compressed; colour packed as 0x00RRGGBB in a float32, as PCL does."""
    rgb = ((colors[:, 0].astype(np.uint32) << 16) | (colors[:, 1].astype(np.uint32) << 8)
           | colors[:, 2]).view(np.float32)
    columns = [pts[:, 0], pts[:, 1], pts[:, 2], rgb, *normals.T, intensity]
    raw = b"".join(np.ascontiguousarray(c, "<f4").tobytes() for c in columns)
    packed = lzf_literals(raw)
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
              "FIELDS x y z rgb normal_x normal_y normal_z intensity\n"
              "SIZE 4 4 4 4 4 4 4 4\nTYPE F F F F F F F F\nCOUNT 1 1 1 1 1 1 1 1\n"
              f"WIDTH {len(pts)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(pts)}\n"
              "DATA binary_compressed\n")
    path.write_bytes(header.encode() + struct.pack("<II", len(packed), len(raw)) + packed)


def test_channels_follow_the_points_through_every_format(tmp_path):
    """Colour, normals and intensity of hand-written binary PLYs (both byte orders) and a
    hand-written binary_compressed PCD, and of the same written by plyfile, pypcd4 and laspy,
    stay with their points through resampling; a channel that one cloud lacks is not
    stored, and --channels none stores none."""
    plyfile = pytest.importorskip("plyfile")
    pypcd4 = pytest.importorskip("pypcd4")
    laspy = pytest.importorskip("laspy")
    pts, colors, normals, intensity = channel_source()
    root = tmp_path / "scans"
    root.mkdir()
    hand_written_ply(root / "a_le.ply", "<", pts, colors, normals, intensity)
    hand_written_ply(root / "b_be.ply", ">", pts, colors, normals, intensity)
    hand_written_pcd(root / "c_hand.pcd", pts, colors, normals, intensity)
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4"), ("ny", "f4"), ("nz", "f4"),
              ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("intensity", "f4")]
    vertex = np.array([(*p, *n, *c, i) for p, n, c, i in zip(pts, normals, colors, intensity)],
                      dtype=fields)
    plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex")], text=True).write(
        str(root / "d_ascii.ply"))
    rgb = pypcd4.PointCloud.encode_rgb(colors)
    pc = pypcd4.PointCloud.from_points(
        [*pts.T, rgb, *normals.T, intensity],
        ("x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z", "intensity"),
        (np.float32,) * 8)
    pc.save(root / "e_lib.pcd", encoding=pypcd4.Encoding.BINARY_COMPRESSED)
    las = laspy.create(point_format=3, file_version="1.2")  # colour, no normals
    las.header.scales, las.header.offsets = np.full(3, 1 / 1024), np.zeros(3)
    las.x, las.y, las.z = pts[:, 0], pts[:, 1], pts[:, 2]
    las.red, las.green, las.blue = (colors.T.astype(np.uint16) * 257)  # 16-bit colour
    las.intensity = intensity.astype(np.uint16)
    las.write(str(root / "f_scan.las"))
    out = tmp_path / "c.h5"
    summary = folder.main(folder.Config(root=root, out=out, points=200))
    assert summary["clouds"] == 6 and summary["skipped"] == 0
    assert summary["channels"] == ["colors", "intensity"]
    assert summary["channel_notes"] == ["normals not stored: 5 of 6 clouds had them (a channel "
                                        "is stored only when every cloud of the file has it)"]
    where = {tuple(p): i for i, p in enumerate(pts)}
    with h5py.File(out) as f:
        assert f["train/colors"].dtype == np.uint8 and f["train/colors"].shape == (6, 200, 3)
        assert f["train/intensity"].dtype == np.float32 and f["train/intensity"].shape == (6, 200)
        assert "train/normals" not in f and f["test/colors"].shape == (0, 200, 3)
        for k in range(6):
            idx = [where[tuple(p)] for p in f["train/points"][k]]
            assert sorted(idx) == list(range(200)), k  # every point once, shuffled
            assert (f["train/colors"][k] == colors[idx]).all(), k
            assert (f["train/intensity"][k] == intensity[idx]).all(), k
    # without the LAS, every cloud has normals: kept, in order with their points
    (root / "f_scan.las").unlink()
    summary = folder.main(folder.Config(root=root, out=out, points=64))
    assert summary["channels"] == ["colors", "normals", "intensity"]
    with h5py.File(out) as f:
        for k in range(5):
            idx = [where[tuple(p)] for p in f["train/points"][k]]
            assert (f["train/normals"][k] == normals[idx]).all(), k
            assert (f["train/colors"][k] == colors[idx]).all(), k
    folder.main(folder.Config(root=root, out=out, points=64, channels="none"))
    with h5py.File(out) as f:
        assert sorted(f["train"].keys()) == ["points"]


def test_a_corrupt_file_in_the_middle_and_degenerate_meshes(tmp_path):
    """A truncated PLY, a PCD with a damaged LZF stream and a mesh whose every face has zero
    area are skipped and listed; the files around them are converted; a mesh with some
    zero-area faces is sampled on its real face only, with that face's normal."""
    pytest.importorskip("plyfile")
    pytest.importorskip("pypcd4")
    pytest.importorskip("trimesh")
    pts, colors, normals, intensity = channel_source(100)
    root = tmp_path / "scans"
    root.mkdir()
    np.save(root / "a.npy", pts)
    hand_written_ply(root / "b_truncated.ply", "<", pts, colors, normals, intensity)
    (root / "b_truncated.ply").write_bytes((root / "b_truncated.ply").read_bytes()[:-700])
    hand_written_pcd(root / "c_damaged.pcd", pts, colors, normals, intensity)
    raw = bytearray((root / "c_damaged.pcd").read_bytes())
    raw[raw.index(b"binary_compressed\n") + 18 + 8] = 0xE0  # a back-reference before the start
    (root / "c_damaged.pcd").write_bytes(bytes(raw))
    # a triangle (area 2) in z = 0, a collinear face and one with a repeated vertex
    (root / "d_mesh.obj").write_text("v 0 0 0\nv 2 0 0\nv 0 2 0\nv 1 0 0\n"
                                     "f 1 2 3\nf 1 4 2\nf 1 1 3\n")
    (root / "e_flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    np.save(root / "f.npy", pts[::-1])
    summary = folder.main(folder.Config(root=root, out=tmp_path / "o.h5", points=128))
    assert summary["files"] == 6 and summary["clouds"] == 3 and summary["skipped"] == 3
    listing = (tmp_path / "o.h5.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listing] == [
        str(root / n) for n in ("b_truncated.ply", "c_damaged.pcd", "e_flat.obj")]
    assert listing[0].split("\t")[1].startswith("unreadable (")
    assert listing[1].split("\t")[1].startswith("unreadable (")
    assert listing[2].endswith("\ta mesh of zero surface area (every face degenerate)") or \
        listing[2].endswith("\ta mesh without faces")
    with h5py.File(tmp_path / "o.h5") as f:
        mesh = f["train/points"][1]
        assert {tuple(p) for p in f["train/points"][0]} == {tuple(p) for p in pts}
        assert {tuple(p) for p in f["train/points"][2]} == {tuple(p) for p in pts}
    assert (mesh[:, 2] == 0).all() and (mesh[:, :2] >= 0).all() and (mesh[:, :2].sum(1) <= 2).all()
    # float16 holds coordinates up to 65504: a cloud beyond is skipped, not stored as inf
    np.save(root / "g_far.npy", pts * 1e5)
    summary = folder.main(folder.Config(root=root, out=tmp_path / "h.h5", dtype="float16",
                                        points=128))
    assert summary["clouds"] == 3 and "g_far.npy\tcoordinates beyond +-65504 do not fit " \
        "--dtype float16" in (tmp_path / "h.h5.skipped.txt").read_text()


def test_a_mesh_gives_its_face_normals(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    root = tmp_path / "m"
    root.mkdir()
    trimesh.creation.box().export(str(root / "box.stl"))
    folder.main(folder.Config(root=root, out=tmp_path / "m.h5", points=256))
    with h5py.File(tmp_path / "m.h5") as f:
        p, n = f["train/points"][0], f["train/normals"][0]
    # on a unit box each normal is the axis of the face its point lies on, pointing out
    axis = np.abs(n).argmax(1)
    assert np.allclose(np.abs(n).max(1), 1)
    assert np.allclose(np.abs(p[np.arange(256), axis]), 0.5, atol=1e-6)
    assert (np.sign(p[np.arange(256), axis]) == n[np.arange(256), axis]).all()


# --------------------------------------------------------------------------------------------
# Workers, shards and --resume


def mixed_tree(root, n: int = 9) -> None:
    """Clouds larger and smaller than 64 points, with and without normals, a mesh and a bad
    file: every path of the per-file work."""
    root.mkdir()
    for i in range(n):
        np.save(root / f"{i:02d}.npy", cloud(40 + 97 * i, 100 + i))
    np.savez(root / "n.npz", points=cloud(500, 7), normals=cloud(500, 8))
    (root / "zz_bad.txt").write_text("1 2 3\nnot numbers\n")
    (root / "mesh.off").write_text("OFF\n4 2 0\n0 0 0\n1 0 0\n0 1 0\n1 1 1\n3 0 1 2\n3 1 2 3\n")


def h5_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".h5"} \
        if path.is_dir() else path.read_bytes()


def test_the_output_does_not_depend_on_the_workers(tmp_path, monkeypatch):
    """1 or 2 worker processes, FPS in the workers or in the parent (as on a GPU machine):
    byte-identical files, each file drawing from its own (seed, index) generator."""
    mixed_tree(tmp_path / "in")
    base = folder.Config(root=tmp_path / "in", out=tmp_path / "w1.h5", points=64, fps_pool=3,
                         min_points=16, workers=1)
    one = folder.main(base)
    two = folder.main(dataclasses.replace(base, out=tmp_path / "w2.h5", workers=2))
    assert one["clouds"] == two["clouds"] == 11 and one["skipped"] == 1
    monkeypatch.setattr(folder, "fps_device", lambda cfg: "cpu")  # the parent runs FPS
    folder.main(dataclasses.replace(base, out=tmp_path / "parent.h5", workers=2))
    monkeypatch.undo()
    w1 = h5_bytes(tmp_path / "w1.h5")
    assert w1 == h5_bytes(tmp_path / "w2.h5") == h5_bytes(tmp_path / "parent.h5")
    folder.main(dataclasses.replace(base, out=tmp_path / "r1.h5", sample="random"))
    folder.main(dataclasses.replace(base, out=tmp_path / "r2.h5", sample="random", workers=2))
    assert h5_bytes(tmp_path / "r1.h5") == h5_bytes(tmp_path / "r2.h5")
    # another seed draws differently; FPS from a pool of 3 x 64 random points of the cloud
    folder.main(dataclasses.replace(base, out=tmp_path / "s.h5", seed=1))
    with h5py.File(tmp_path / "w1.h5") as f, h5py.File(tmp_path / "s.h5") as g:
        assert not np.array_equal(f["train/points"][()], g["train/points"][()])
        big = f["train/points"][8]  # 08.npy: 816 points
    source = np.load(tmp_path / "in" / "08.npy").astype(np.float32)
    picked = {tuple(p) for p in big}
    assert len(picked) == 64 and picked <= {tuple(p) for p in source}


def test_a_worker_that_dies_skips_its_file_and_the_run_goes_on(tmp_path, monkeypatch):
    """A reader that ends its process (as a crash on a damaged file, or the kernel's
    out-of-memory killer, would) costs that file only: skipped with the reason, the others
    converted as in a run without it."""
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the crash is planted by patching this process, which fork copies")
    mixed_tree(tmp_path / "in")
    base = folder.Config(root=tmp_path / "in", out=tmp_path / "ok.h5", points=64, min_points=16,
                         workers=2)
    folder.main(base)
    np.save(tmp_path / "in" / "05_crash.npy", cloud(100, 1))
    read_file = folder.read_file

    def crashing(path, *args, **kwargs):
        if path.name == "05_crash.npy":
            os._exit(1)
        return read_file(path, *args, **kwargs)

    monkeypatch.setattr(folder, "read_file", crashing)
    summary = folder.main(dataclasses.replace(base, out=tmp_path / "crash.h5"))
    assert summary["clouds"] == 11 and summary["skipped"] == 2
    assert "05_crash.npy\tits worker process died reading it" in \
        (tmp_path / "crash.h5.skipped.txt").read_text()
    with h5py.File(tmp_path / "ok.h5") as f, h5py.File(tmp_path / "crash.h5") as g:
        # the files after it have other indices, so other draws: compare the ones before
        assert np.array_equal(f["train/points"][:6], g["train/points"][:6])


def test_shards_resume_after_an_interruption(tmp_path, monkeypatch):
    """--shard-size writes a directory of pretraining files and a manifest; a conversion
    stopped mid-way, resumed, gives the same bytes as one that ran through; the skipped list
    is complete; pretraining reads the directory."""
    mixed_tree(tmp_path / "in")
    base = folder.Config(root=tmp_path / "in", out=tmp_path / "full", points=64, min_points=16,
                         shard_size=4)
    summary = folder.main(base)
    full = tmp_path / "full"
    assert summary["shards"] == 3 and summary["clouds"] == 11 and summary["skipped"] == 1
    names = ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert sorted(p.name for p in full.iterdir()) == sorted(
        names + ["manifest.json", "shard-00002.skipped.json"])
    manifest = json.loads((full / "manifest.json").read_text())
    # 12 files: 00-08.npy | mesh.off n.npz zz_bad.txt (skipped) in the last shard
    assert [(s["files"], s["clouds"]) for s in manifest["shards"]] == [
        ([0, 4], 4), ([4, 8], 4), ([8, 12], 3)]
    assert manifest["skipped"] == 1 and manifest["shards"][2]["skipped"] == 1
    assert manifest["config"]["shard_size"] == 4 and manifest["points"] == 64
    with h5py.File(full / names[0]) as f:
        assert f["train/points"].shape == (4, 64, 3) and f["test/points"].shape == (0, 64, 3)
        assert f["train/points"].chunks is None and f.attrs["checked_finite"]
        assert f.attrs["format_version"] == data.SHAPENET55_FORMAT_VERSION
    blocks = data.pretrain_blocks(full)
    assert [b.count for b in blocks if b.group == "train"] == [4, 4, 3]
    assert all(b.offsets is not None and b.checked for b in blocks)  # mapped from the files
    assert data.load_shapenet55(full).shape == (11, 64, 3)

    # stopped while writing its last shard: two complete shards, nothing else
    write_part, calls = folder.write_part, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return write_part(*args, **kwargs)

    monkeypatch.setattr(folder, "write_part", stopped)
    cut = dataclasses.replace(base, out=tmp_path / "cut")
    with pytest.raises(RuntimeError, match="killed"):
        folder.main(cut)
    monkeypatch.undo()
    # (the last shard's skipped list is written first: without its shard it is not kept)
    assert sorted(p.name for p in cut.out.iterdir()) == names[:2] + ["shard-00002.skipped.json"]
    (cut.out / "shard-00002.h5.tmp").write_bytes(b"half a shard")  # as a kill leaves it
    with pytest.raises(ConversionError, match="already holds shards.*pass --resume"):
        folder.main(cut)
    resumed = folder.main(dataclasses.replace(cut, resume=True))
    assert resumed["kept"] == 2 and resumed["clouds"] == 11 and resumed["skipped"] == 1
    assert h5_bytes(cut.out) == h5_bytes(full) and not list(cut.out.glob("*.tmp"))
    assert (tmp_path / "cut.skipped.txt").read_text() == (tmp_path / "full.skipped.txt").read_text()
    assert json.loads((cut.out / "manifest.json").read_text())["shards"] == manifest["shards"]

    # a damaged shard, or one whose skipped files' list is gone, is written again
    (cut.out / names[1]).write_bytes((cut.out / names[1]).read_bytes()[:1000])
    (cut.out / "shard-00002.skipped.json").unlink()
    resumed = folder.main(dataclasses.replace(cut, resume=True, workers=1))
    assert resumed["kept"] == 1 and resumed["skipped"] == 1 and h5_bytes(cut.out) == h5_bytes(full)
    # other settings: every shard written again
    resumed = folder.main(dataclasses.replace(cut, resume=True, points=32))
    assert resumed["kept"] == 0 and data.load_shapenet55(cut.out).shape == (11, 32, 3)
    # refused: labelled shards, a directory of other files
    with pytest.raises(ConversionError, match="--shard-size is for unlabelled sets"):
        folder.main(dataclasses.replace(base, labels="folders"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.h5").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"holds files that are not this converter's "
                                              r"shards \(x\.h5\)"):
        folder.main(dataclasses.replace(base, out=tmp_path / "other"))


# --------------------------------------------------------------------------------------------
# Labels from a CSV, splits from lists


def test_labels_from_a_csv_and_splits_from_lists(tmp_path):
    root = tmp_path / "objects"
    (root / "scans").mkdir(parents=True)
    rows = ["file,label"]
    for i in range(8):
        kind = ("ball", "box")[i % 2]
        np.save(root / "scans" / f"{i}.npy", cloud(300, i, kind))
        rows.append(f"scans/{i}.npy,{10 if kind == 'box' else 9}")  # integers: numeric order
    np.save(root / "scans" / "unlabelled.npy", cloud(300, 50))
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "o.h5"
    cfg = folder.Config(root=root, out=out, labels="csv", label_file=labels, points=256,
                        test_fraction=0.25)
    summary = folder.main(cfg)
    assert summary["classes"] == 2 and summary["train"] + summary["test"] == 8
    assert "unlabelled.npy\tnot in labels.csv" in (tmp_path / "o.h5.skipped.txt").read_text()
    with h5py.File(out) as f:
        assert list(f.attrs["classes"]) == ["9", "10"]
        assert sorted(f["test/labels"][()].tolist()) == [0, 1]
    # the label file may sit under --root: it is not a cloud
    (root / "labels.csv").write_text(labels.read_text())
    summary = folder.main(dataclasses.replace(cfg, label_file=root / "labels.csv"))
    assert summary["files"] == 9 and summary["skipped"] == 1
    (root / "labels.csv").unlink()

    # train and test from two lists; a file in neither is skipped
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("scans/0.npy\nscans/1.npy\nscans/2.npy\nscans/3.npy\n\n")
    test.write_text("scans/4.npy\nscans/5.npy\n")
    summary = folder.main(dataclasses.replace(cfg, split_files=(train, test)))
    assert summary["train"] == 4 and summary["test"] == 2 and summary["skipped"] == 3
    assert "scans/6.npy\tin neither train.txt nor test.txt" in \
        (tmp_path / "o.h5.skipped.txt").read_text()
    with h5py.File(out) as f:
        assert f["train/labels"][()].tolist() == [0, 1, 0, 1]  # 0-3.npy: ball box ball box
        assert f["test/labels"][()].tolist() == [0, 1]
    # folders labels with split lists
    folder_root = tmp_path / "cls"
    for kind in ("ball", "box"):
        (folder_root / kind).mkdir(parents=True)
        for i in range(2):
            np.save(folder_root / kind / f"{i}.npy", cloud(300, i, kind))
    (tmp_path / "tr.txt").write_text("ball/0.npy\nbox/0.npy\n")
    (tmp_path / "te.txt").write_text("ball/1.npy\nbox/1.npy\n")
    summary = folder.main(folder.Config(root=folder_root, out=out, labels="folders", points=256,
                                        split_files=(tmp_path / "tr.txt", tmp_path / "te.txt")))
    assert (summary["train"], summary["test"], summary["skipped"]) == (2, 2, 0)

    # mistakes: a row naming a missing file, a file in both lists
    labels.write_text("scans/0.npy,9\nscans/missing.npy,9\nscans/1.npy,10\n")
    with pytest.raises(ConversionError, match=r"labels\.csv: expected lines `file,label`.*1 rows "
                                              r"naming files not under --root: "
                                              r"scans/missing\.npy \(line 2\)"):
        folder.main(cfg)
    labels.write_text("\n".join(rows) + "\n")
    test.write_text("scans/3.npy\n")
    with pytest.raises(ConversionError, match=r"1 files in both lists: scans/3\.npy"):
        folder.main(dataclasses.replace(cfg, split_files=(train, test)))
    with pytest.raises(ConversionError, match="--labels csv needs --label-file"):
        folder.main(dataclasses.replace(cfg, label_file=None))
