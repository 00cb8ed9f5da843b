"""pqae.embed: the API's three levels on tensors, NumPy arrays and single clouds, and
`python -m pqae.embed` on every input kind, resumed after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import pqae
import pretrain
from conftest import ROOT, small_pretrain_config
from pqae import embed
from pqae.cli import parse
from pqae.errors import BadInput, MissingFile

LEVELS = ("global", "patch", "point")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small pretraining checkpoint (one step: the shapes matter here, not the quality):
    256 points, 16 patches of 16 points, width 48."""
    tmp = tmp_path_factory.mktemp("pre")
    pretrain.main(small_pretrain_config(tmp, procedural_shapes=16, epochs=1, warmup_epochs=0,
                                        log_every=100))
    return tmp / "run" / "ckpt-final"


@pytest.fixture(scope="module")
def encoder(ckpt):
    return pqae.load_encoder(ckpt)


def clouds(count: int, n: int, seed: int) -> np.ndarray:
    """(count, n, 3) float32, off-centre and larger than the unit sphere."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, n, 3)) * 2 + [1.0, -2.0, 0.5]).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """kind -> (--data path, the clouds in the order the output must hold them)."""
    tmp = tmp_path_factory.mktemp("inputs")
    out = {}
    # A pretraining file: 300 points (FPS down to 256), float16; split all = test, then train.
    train, test = clouds(5, 300, 0).astype(np.float16), clouds(3, 300, 1).astype(np.float16)
    with h5py.File(tmp / "pre.h5", "w") as f:
        f["train/points"], f["test/points"] = train, test
    out["pretraining"] = tmp / "pre.h5", [*test.astype(np.float32), *train.astype(np.float32)]
    (tmp / "shards").mkdir()
    for i in range(2):
        with h5py.File(tmp / "shards" / f"part-{i}.h5", "w") as f:
            f["train/points"], f["test/points"] = clouds(2, 300, 10 + i), clouds(0, 300, 0)
    out["shards"] = tmp / "shards", [*clouds(2, 300, 10), *clouds(2, 300, 11)]
    # A classification file: 200 points (all used), labels, names and class names.
    with h5py.File(tmp / "cls.h5", "w") as f:
        for split, k, seed in (("train", 4, 2), ("test", 3, 3)):
            f[f"{split}/points"] = clouds(k, 200, seed)
            f[f"{split}/labels"] = np.arange(k) % 3
            f.create_dataset(f"{split}/names", data=np.array([f"{split}_{i}" for i in range(k)],
                                                             dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        f.attrs["classes"] = ["chair", "lamp", "table"]
    out["classification"] = tmp / "cls.h5", [*clouds(3, 200, 3), *clouds(4, 200, 2)]
    np.save(tmp / "many.npy", clouds(5, 280, 4))
    out["npy"] = tmp / "many.npy", list(clouds(5, 280, 4))
    np.save(tmp / "one.npy", clouds(1, 500, 5)[0])
    out["npy-one"] = tmp / "one.npy", list(clouds(1, 500, 5))
    # A folder: sorted by path; 5 NaN rows dropped; 100 points (< 256: padded at point level).
    root = tmp / "scans"
    (root / "sub").mkdir(parents=True)
    a, c, b = clouds(1, 400, 6)[0], clouds(1, 300, 7)[0], clouds(1, 100, 8)[0]
    np.save(root / "a.npy", a)
    with_nan = c.copy()
    with_nan[[0, 3, 50, 51, 299], 1] = np.nan
    np.save(root / "c.npy", with_nan)
    np.savetxt(root / "sub" / "b.xyz", b)
    (root / "notes.md").write_text("not a cloud")
    finite = np.isfinite(with_nan).all(1)
    out["folder"] = root, [a, c[finite], np.loadtxt(root / "sub" / "b.xyz").astype(np.float32)]
    return out


def embed_cli(*args: str) -> dict:
    """`python -m pqae.embed ARGS` in this process (the real flag parsing and main)."""
    return embed.main(parse(embed.Config, {"default": embed.Config()},
                            args=[*args, "--device", "cpu"]))


@pytest.mark.parametrize("kind", ["pretraining", "shards", "classification", "npy", "npy-one",
                                  "folder"])
def test_cli_writes_every_level_of_every_input_kind(kind, ckpt, encoder, inputs, tmp_path):
    data, raw = inputs[kind]
    C, G = 48, 16
    files = {}
    for level in LEVELS:
        out = tmp_path / f"{level}.h5"
        result = embed_cli("--ckpt", str(ckpt), "--data", str(data), "--out", str(out),
                           "--level", level, "--batch-size", "2")
        assert result["clouds"] == len(raw) and out.is_file()
        assert not out.with_name(out.name + ".tmp").exists()
        files[level] = f = h5py.File(out, "r")
        assert f.attrs["level"] == level and f.attrs["done"] == f.attrs["clouds"] == len(raw)
    glob, patch, point = files["global"], files["patch"], files["point"]
    S = len(raw)
    n = min(min(len(c) for c in raw) if kind != "folder" else 256, 256)
    assert glob["features"].shape == (S, 2 * C) and glob["features"].dtype == np.float32
    assert patch["features"].shape == (S, G, C) and patch["features"].dtype == np.float16
    assert patch["centers"].shape == (S, G, 3)
    assert point["features"].shape == (S, n, C) and point["features"].dtype == np.float16
    assert point["points"].shape == (S, n, 3) and point["index"].shape == (S, n)

    # The stored numbers are the API's, cloud by cloud (float16 to its precision).
    for i, cloud in enumerate(raw):
        assert np.allclose(glob["features"][i], encoder.embed(cloud), atol=1e-5)
        features, centers = encoder.embed(cloud, level="patch")
        assert np.allclose(patch["features"][i], features, rtol=2e-3, atol=2e-3)
        assert np.allclose(patch["centers"][i], centers, atol=1e-5)
        features, used = encoder.embed(cloud, level="point")
        k = int(point["count"][i])
        assert k == min(len(cloud), 256)
        assert np.allclose(point["features"][i, :k], features, rtol=2e-3, atol=2e-3)
        assert np.array_equal(point["points"][i, :k], used)
        if not (kind == "folder" and i == 1):  # c.npy lost rows: checked below
            assert np.array_equal(cloud[point["index"][i, :k]], used)  # rows of the input
    # The global feature is concat[class token, max over the patch outputs].
    assert np.allclose(patch["features"][()].astype(np.float32).max(1),
                       glob["features"][:, C:], rtol=2e-3, atol=2e-3)

    # What the input carries comes along.
    if kind == "classification":
        assert list(glob["labels"][()]) == [0, 1, 2, 0, 1, 2, 0]  # test, then train
        assert [s.decode() for s in glob["names"][()]][:4] == ["test_0", "test_1", "test_2",
                                                                "train_0"]
        assert list(glob.attrs["classes"]) == ["chair", "lamp", "table"]
    if kind in ("pretraining", "classification"):
        assert glob["is_test"][()].tolist() == [True] * 3 + [False] * (S - 3)
    if kind == "folder":
        assert [s.decode() for s in point["names"][()]] == ["a.npy", "c.npy", "sub/b.xyz"]
        # c.npy lost 5 NaN rows: its index still counts the file's rows.
        c = np.load(data / "c.npy")
        assert np.array_equal(c[point["index"][1]], point["points"][1])
        # sub/b.xyz has 100 points: padded to 256.
        assert point["count"][2] == 100 and (point["index"][2, 100:] == -1).all()
        assert np.isnan(point["points"][2, 100:]).all() and not point["features"][2, 100:].any()
    for f in files.values():
        f.close()


def test_api_levels_numpy_and_one_cloud(encoder):
    x = torch.from_numpy(clouds(3, 300, 20))
    C = encoder.encoder.dim
    glob = encoder.embed(x)
    assert torch.equal(glob, encoder.features(encoder.prepare(x)))  # the global level as before
    features, centers = encoder.embed(x, level="patch")
    assert features.shape == (3, 16, C) and centers.shape == (3, 16, 3)
    assert torch.equal(features.amax(dim=1), glob[:, C:])  # same numbers, not just close
    # Each centre is a point of its input cloud (an FPS pick), in the input's frame.
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(centers, x, compute_mode=exact).amin(dim=2).max() < 1e-5
    per_point, used = encoder.embed(x, level="point")
    assert per_point.shape == (3, 256, C) and used.shape == (3, 256, 3)
    index = encoder.sample(x)[1]  # (3, 256): the FPS picks
    assert torch.equal(used, torch.stack([x[b, i] for b, i in enumerate(index)]))  # input rows
    assert torch.allclose(encoder.embed(x, batch_size=2, level="point")[0], per_point, atol=1e-5)

    # NumPy in, NumPy out; one cloud (N, 3) in, no batch dimension out.
    assert np.array_equal(encoder.embed(x.numpy()), glob.numpy())
    one = encoder.embed(x[1].numpy())
    assert isinstance(one, np.ndarray) and one.shape == (2 * C,)
    assert np.allclose(one, glob[1].numpy(), atol=1e-5)
    assert encoder.embed(x[1].numpy().astype(np.float64)).shape == (2 * C,)
    f1, c1 = encoder.embed(x[1], level="patch")
    assert f1.shape == (16, C) and c1.shape == (16, 3)
    assert torch.allclose(f1, features[1], atol=1e-5)
    f1, p1 = encoder.embed(x[2].numpy(), level="point")
    assert f1.shape == (256, C) and p1.shape == (256, 3) and isinstance(p1, np.ndarray)
    assert encoder.embed(x[:0], level="patch")[0].shape == (0, 16, C)
    with pytest.raises(BadInput, match="level must be one of"):
        encoder.embed(x, level="patches")
    with pytest.raises(BadInput, match=r"\(B, N, 3\) or one cloud \(N, 3\)"):
        encoder.embed(x[..., :2])


def test_non_finite_clouds_are_refused_by_index(encoder, ckpt, tmp_path):
    x = clouds(5, 100, 21)
    x[3, 7, 1] = np.nan
    for batch_size in (2, 256):
        with pytest.raises(BadInput, match="cloud 3 of the input has NaN or inf"):
            encoder.embed(x, batch_size=batch_size)
        with pytest.raises(BadInput, match="cloud 3 of the input"):
            encoder.embed(torch.from_numpy(x), batch_size=batch_size, level="point")
    x[3, 7, 1] = np.inf
    with pytest.raises(BadInput, match="cloud 0 of the input"):
        encoder.embed(x[3])
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(BadInput, match=r"bad\.npy cloud 3 has NaN or inf"):
        embed_cli("--ckpt", str(ckpt), "--data", str(tmp_path / "bad.npy"),
                  "--out", str(tmp_path / "bad.h5"), "--batch-size", "4")
    assert not list(tmp_path.glob("bad.h5*"))  # refused in the first chunk: nothing left
    with h5py.File(tmp_path / "bad-input.h5", "w") as f:
        f["train/points"], f["test/points"] = x, x[:1]
    with pytest.raises(BadInput, match=r"bad-input\.h5 'train/points' sample 3 has NaN or inf"):
        embed_cli("--ckpt", str(ckpt), "--data", str(tmp_path / "bad-input.h5"),
                  "--out", str(tmp_path / "out.h5"), "--batch-size", "2")
    # Refused in its third chunk (test first: 1 cloud, then train): two chunks to resume from.
    with h5py.File(tmp_path / "out.h5.tmp", "r") as f:
        assert f.attrs["done"] == 4


def test_point_features_are_the_inverse_distance_interpolation_of_the_patches(encoder):
    """Computed directly, in float64, on a 40-point cloud: each point takes the patch outputs
    of its 3 nearest centres, weighted by 1 / (squared distance + 1e-8), normalised."""
    x = torch.from_numpy(clouds(1, 40, 22))
    per_point, used = encoder.embed(x, level="point")
    assert torch.equal(used, x)  # fewer points than the pretraining count: all of them
    with torch.no_grad():
        _, patches, centers = encoder.tokens(encoder.prepare(x))  # the frame the encoder saw
    p, c = encoder.prepare(x)[0].double().numpy(), centers[0].double().numpy()
    f = patches[0].double().numpy()
    d2 = ((p[:, None] - c[None]) ** 2).sum(-1)  # (40, 16)
    near = np.argsort(d2, axis=1)[:, :3]
    w = 1 / (np.take_along_axis(d2, near, 1) + 1e-8)
    w /= w.sum(1, keepdims=True)
    expected = (w[..., None] * f[near]).sum(1)  # (40, C)
    assert np.allclose(per_point[0].numpy(), expected, atol=1e-5)
    # A point that is a centre carries its patch's output; the others really mix three.
    at_centre = d2.min(1) == 0
    assert at_centre.sum() == 16
    assert np.allclose(per_point[0].numpy()[at_centre], f[d2.argmin(1)[at_centre]], atol=1e-5)
    assert not np.allclose(per_point[0].numpy()[~at_centre], f[near[~at_centre, 0]], atol=1e-2)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pqae import embed
    from pqae.cli import parse
    write, calls = embed.write_chunk, []

    def write_then_die(f, start, rows):
        # Third chunk: its rows half written as garbage and flushed, `done` not advanced,
        # then SIGKILL: no clean-up of any kind runs.
        calls.append(start)
        if len(calls) == 3:
            for name, value in rows.items():
                f[name][start:start + 1] = (value[:1] * 0 + 7).astype(f[name].dtype)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(f, start, rows)

    embed.write_chunk = write_then_die
    embed.main(parse(embed.Config, {"default": embed.Config()}, args=sys.argv[1:]))
""")


def python(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": str(ROOT)})


def test_a_killed_run_resumes_to_the_identical_file(ckpt, inputs, tmp_path):
    data, raw = inputs["npy"]
    common = ["--ckpt", str(ckpt), "--data", str(data), "--level", "patch", "--batch-size", "2",
              "--device", "cpu"]
    whole = tmp_path / "whole.h5"
    embed_cli(*common[:-2], "--out", str(whole))
    out, tmp = tmp_path / "feats.h5", tmp_path / "feats.h5.tmp"
    killed = python("-c", KILLED, *common, "--out", str(out), cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    with h5py.File(tmp, "r") as f:  # the file of a killed process opens, at its last flush
        assert f.attrs["done"] == 4 and (f["features"][4] == 7).all()
    with pytest.raises(BadInput, match=r"unfinished run \(4/5 clouds\): continue it with --resume"):
        embed_cli(*common[:-2], "--out", str(out))
    with pytest.raises(BadInput, match="other settings: level 'patch' \\(now 'point'\\)"):
        embed_cli(*common[:-2], "--out", str(out), "--level", "point", "--resume")

    resumed = python("-m", "pqae.embed", *common, "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at 4/5" in resumed.stdout
    assert "embed 5/5 clouds |" in resumed.stdout and "clouds/s | ETA" in resumed.stdout
    assert "done | 5 clouds, level patch" in resumed.stdout and "next: python -c" in resumed.stdout
    assert not tmp.exists()
    with h5py.File(out, "r") as a, h5py.File(whole, "r") as b:
        assert sorted(a) == sorted(b) and dict(a.attrs) == dict(b.attrs)
        for name in a:
            assert np.array_equal(a[name][()], b[name][()]), name
    assert out.read_bytes() == whole.read_bytes()

    # A complete output is kept: refused without --overwrite, left alone by --resume.
    with pytest.raises(BadInput, match="already exists; .* --overwrite"):
        embed_cli(*common[:-2], "--out", str(out))
    assert embed_cli(*common[:-2], "--out", str(out), "--resume")["clouds"] == 0
    assert embed_cli(*common[:-2], "--out", str(out), "--overwrite", "--level", "global")[
        "shapes"]["features"] == [5, 96]


def test_random_encoder_and_command_line_errors(ckpt, inputs, tmp_path):
    data, _ = inputs["npy"]
    result = embed_cli("--ckpt", "random", "--like", str(ckpt), "--data", str(data),
                       "--out", str(tmp_path / "random.h5"))
    assert result["shapes"] == {"features": [5, 96]}
    with h5py.File(tmp_path / "random.h5") as f:
        assert '"ckpt": "random"' in f.attrs["encoder"]
    proc = python("-m", "pqae.embed", "--ckpt", str(ckpt), "--data", str(data), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out is required")
    assert "Traceback" not in proc.stderr
    with pytest.raises(MissingFile, match="does not exist"):
        embed_cli("--ckpt", str(ckpt), "--data", str(tmp_path / "nothing.h5"),
                  "--out", str(tmp_path / "x.h5"))
