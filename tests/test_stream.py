"""Pretraining data read from the files on the host (pqae/stream.py, --data-on host): the same
batches as the resident path for every layout our converters write, the same losses, a
resumed run the same batches, and clear refusals."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import pretrain
from conftest import small_pretrain_config
from pqae import checkpoint as ckpt
from pqae import data, stream
from pqae.errors import BadInput
from pqae.seeding import epoch_perm


def _write(path, counts=(30, 7), n=64, dtype="float32", layout="contiguous", seed=0,
           checked=False):
    """A pretraining HDF5 with `counts` = (train, test) clouds of n points."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for group, count in zip(("train", "test"), counts):
            x = rng.normal(size=(count, n, 3)).astype(dtype)
            kw = {"contiguous": {}, "per-cloud chunks": {"chunks": (1, n, 3)},
                  "chunks of 4": {"chunks": (4, n, 3)},
                  "compressed": {"chunks": (1, n, 3), "compression": "gzip"}}[layout]
            f.create_dataset(f"{group}/points", data=x, **(kw if count else {}))
        if checked:
            f.attrs["checked_finite"] = True
    return path


@pytest.fixture
def shards(tmp_path):
    """A directory of three files in the layouts the converters write (data_prep.folder:
    contiguous; data_prep.shapenet55: one chunk per cloud), with an empty test group too."""
    d = tmp_path / "shards"
    d.mkdir()
    _write(d / "shard-00000.h5", (30, 7), layout="contiguous", seed=1)
    _write(d / "shard-00001.h5", (21, 0), layout="per-cloud chunks", seed=2)
    _write(d / "shard-00002.h5", (11, 5), layout="chunks of 4", seed=3)
    return d


def _resident_share(clouds, seed, step, rank, world, batch):
    per_epoch = clouds.shape[0] // batch
    epoch, i = divmod(step, per_epoch)
    local = batch // world
    return clouds[epoch_perm(seed, epoch, clouds.shape[0])[i * batch + rank * local:][:local]]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_host_batches_are_the_resident_paths(shards, dtype):
    """Every rank's clouds of every step, across epochs, equal the resident path's gather, for
    contiguous and chunked files read through a directory, also after a jump back (a
    benchmark, a resume) and with more readers than steps in flight."""
    if dtype == "float16":
        for f in sorted(shards.iterdir()):
            with h5py.File(f) as src:
                counts = (src["train/points"].shape[0], src["test/points"].shape[0])
            _write(f, counts, dtype="float16", layout="contiguous", seed=len(f.name))
    resident = data.load_shapenet55(shards)  # (74, 64, 3) float32: test then train per file
    assert resident.shape == (74, 64, 3)
    for rank in (0, 1):
        host = stream.HostStream(data.pretrain_blocks(shards), 16, rank, 2, seed=3,
                                 device=torch.device("cpu"), workers=3, ahead=2)
        assert host.shape == tuple(resident.shape) and host.steps_per_epoch == 4
        for step in [*range(13), 2, 3, 4, 11]:
            got = host.batch(step)
            assert got.dtype == torch.float32 and got.shape == (8, 64, 3)
            assert torch.equal(got, _resident_share(resident, 3, step, rank, 2, 16)), (rank, step)
        host.close()


def test_several_paths_are_concatenated_and_must_agree(tmp_path, shards):
    files = sorted(shards.iterdir())
    listed = data.load_shapenet55(",".join(map(str, [files[2], files[0]])), "train")
    assert torch.equal(listed, torch.cat([data.load_shapenet55(files[2], "train"),
                                          data.load_shapenet55(files[0], "train")]))
    other = _write(tmp_path / "other.h5", n=32)
    with pytest.raises(BadInput, match=r"other.h5.*shard-00000.h5 has N = 64"):
        data.pretrain_blocks(f"{files[0]},{other}")
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        data.pretrain_blocks(f"{files[0]},{tmp_path / 'nothing.h5'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without .h5 files"):
        data.pretrain_blocks(tmp_path / "empty")


def _cfg(tmp_path, shards, name, **kw):
    return small_pretrain_config(tmp_path / name, data="shapenet55", data_path=str(shards),
                                 num_points=48, num_group=8, group_size=8, epochs=1, **kw)


def test_pretraining_from_the_host_equals_the_resident_run_and_resumes(tmp_path, shards,
                                                                       capsys):
    """The same config on either path: identical losses and weights. A host run stopped
    mid-epoch and resumed ends where the uninterrupted one does."""
    device = pretrain.main(_cfg(tmp_path, shards, "device", data_on="device"))
    assert "data on device (--data-on device" in capsys.readouterr().out
    host = pretrain.main(_cfg(tmp_path, shards, "host", data_on="host", data_workers=2))
    out = capsys.readouterr().out
    assert "data on host (--data-on host" in out and "checking 74 clouds of 5 dataset(s)" in out
    assert host["step"] == device["step"] == 8
    assert [h["loss"] for h in host["history"]] == [h["loss"] for h in device["history"]]
    for (k, a), b in zip(device["model"].state_dict().items(), host["model"].state_dict().values()):
        assert torch.equal(a, b), k
    pretrain.main(_cfg(tmp_path, shards, "resumed", data_on="host", max_steps=3))
    resumed = pretrain.main(_cfg(tmp_path, shards, "resumed", data_on="host", resume=True))
    assert resumed["history"] == host["history"]
    final = ckpt.load_weights(tmp_path / "resumed" / "run" / "ckpt-final")
    assert all(torch.equal(final[k], v) for k, v in
               ckpt.load_weights(tmp_path / "host" / "run" / "ckpt-final").items())


def test_auto_reads_from_the_host_when_the_data_would_not_fit(tmp_path, shards, capsys,
                                                              monkeypatch):
    need = 74 * 64 * 3 * 4
    assert stream.fits_on_device((74, 64, 3), torch.device("cpu"))[0]
    monkeypatch.setattr(stream.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1}.get(name, need))
    fits, why = stream.fits_on_device((74, 64, 3), torch.device("cpu"), processes=2)
    assert not fits and "> 25% of" in why and "/ 2 processes" in why
    pretrain.main(_cfg(tmp_path, shards, "auto", max_steps=1))
    assert "data on host (auto: " in capsys.readouterr().out


def test_clouds_that_cannot_be_read_one_by_one_or_normalised_are_refused(tmp_path):
    packed = _write(tmp_path / "packed.h5", layout="compressed")
    with pytest.raises(BadInput, match=r"packed.h5 'test/points' is compressed.*--data-on device"):
        stream.HostStream(data.pretrain_blocks(packed), 8, 0, 1, 0, torch.device("cpu"))
    assert data.load_shapenet55(packed).shape == (37, 64, 3)  # the resident path reads it

    bad = _write(tmp_path / "bad.h5", (40, 0))
    with h5py.File(bad, "r+") as f:
        f["train/points"][33, 5, 1] = np.nan
    files = stream.CloudFiles(data.pretrain_blocks(bad, "train"))
    with pytest.raises(BadInput, match=r"bad.h5 'train/points'.*NaN or inf values in sample\(s\) 33"):
        files.check(chunk=16)  # the index counts from the group's start, not the chunk's
    # a converter's checked_finite attribute is trusted: no second pass over the data
    trusted = _write(tmp_path / "trusted.h5", checked=True)
    lines = []
    stream.CloudFiles(data.pretrain_blocks(trusted)).check(lines.append)
    assert lines == []

    cut = _write(tmp_path / "cut.h5", (40, 0))
    blocks = data.pretrain_blocks(cut, "train")
    with open(cut, "r+b") as f:
        f.truncate(blocks[0].offsets[0] + 10 * blocks[0].cloud_bytes)
    with pytest.raises(BadInput, match=r"cut.h5: cloud 20 of 'train/points' ends past the end"):
        stream.CloudFiles(blocks).read(20, np.empty((64, 3), np.float32))


def test_benchmark_reports_the_host_paths_rate(shards):
    r = stream.benchmark(str(shards), batch_size=16, steps=6, workers=2)
    assert r["shapes_per_s"] > 0 and r["steps"] == 6 and r["points"] == 64


def test_plan_counts_the_data_on_the_device_only_when_they_are_there(tmp_path, shards):
    on_device = pretrain.plan(_cfg(tmp_path, shards, "p", data_on="device"))
    assert on_device["data_bytes"] == 74 * 64 * 3 * 4  # the files' own size, widened
    assert pretrain.plan(_cfg(tmp_path, shards, "p", data_on="host"))["data_bytes"] == 0


def test_fewer_clouds_than_a_batch_is_a_clear_error(shards):
    with pytest.raises(BadInput, match="74 clouds are fewer than one batch of 128"):
        stream.HostStream(data.pretrain_blocks(shards), 128, 0, 1, 0, torch.device("cpu"))
