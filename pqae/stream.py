"""Pretraining data larger than device memory: clouds read from their files on the host, a few
steps ahead of the step that needs them.

The resident path (`data.load_shapenet55`) holds the whole set on the device, and each step
gathers its batch there. That needs S x N x 3 x 4 bytes per process: 5.2 GB for ShapeNet-55,
but ~38 GB for an Objaverse-sized set even in float16. `HostStream` keeps only the files'
metadata: for step s it reads the rank's clouds of that step straight from the files
(`os.preadv` of each cloud's bytes, as stored: float32 or float16) into a pinned buffer, on
background threads, `ahead` steps early; the copy to the GPU runs on its own stream, and the
step waits for it only on the device. What reaches the step is exactly what the resident
path would have gathered (the same clouds in the same order, widened to float32), and the
random point subset is then drawn by the same `data.sample_points` from the same seeded
generator: the two paths give the same losses, and a resumed run the same batches.

    stream = HostStream(data.pretrain_blocks(path, split), batch_size, rank, world_size, seed,
                        device, workers=2, ahead=2)
    clouds = stream.batch(step)       # (batch_size // world_size, N, 3) float32 on `device`

`python -m pqae.stream --data-path FILE|DIR` measures how many shapes/s the host side
delivers (`benchmark`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pqae.data import CloudBlock, check_clouds
from pqae.errors import BadInput
from pqae.seeding import epoch_perm


class CloudFiles:
    """The clouds of `blocks`, concatenated, read on demand: `read(i, out)` fills `out`
    (N, 3) in the stored dtype with cloud i's bytes."""

    def __init__(self, blocks: list[CloudBlock]):
        if not blocks:
            raise BadInput("no pretraining data to read")
        self.blocks = blocks
        self.points, self.dtype = blocks[0].points, blocks[0].dtype
        dtypes = {b.dtype for b in blocks}
        if len(dtypes) > 1:
            raise BadInput(f"the pretraining files mix dtypes {sorted(map(str, dtypes))}; "
                           f"convert them to one (data_prep.folder --dtype)")
        for b in blocks:
            if b.offsets is None:
                raise BadInput(
                    f"{b.path} '{b.group}/points' is compressed or chunked across clouds, so its "
                    f"clouds cannot be read one by one from the file; rewrite it uncompressed "
                    f"(`h5repack -l CONTI {b.path} OUT.h5`) or read it into memory with "
                    f"--data-on device")
        self.starts = np.cumsum([0] + [b.count for b in blocks])  # first cloud of each block
        self._fds = {p: os.open(p, os.O_RDONLY) for p in dict.fromkeys(b.path for b in blocks)}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def cloud_bytes(self) -> int:
        return self.blocks[0].cloud_bytes

    def where(self, i: int) -> tuple[CloudBlock, int]:
        """(its block, its byte offset in the block's file) of cloud i."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        b, j = self.blocks[k], i - int(self.starts[k])
        return b, int(b.offsets[j // b.run]) + (j % b.run) * b.cloud_bytes

    def read(self, i: int, out: np.ndarray) -> None:
        b, offset = self.where(i)
        view = memoryview(out).cast("B")
        n = os.preadv(self._fds[b.path], [view], offset)
        if n != len(view):
            raise BadInput(f"{b.path}: cloud {i - int(self.starts[self.blocks.index(b)])} of "
                           f"'{b.group}/points' ends past the end of the file (truncated?)")

    def check(self, log=print, chunk: int = 1024) -> None:
        """The resident loader's refusals (NaN, huge or flat clouds) for every block that no
        converter vouched for (no `checked_finite` attribute): one pass over their clouds."""
        todo = [(k, b) for k, b in enumerate(self.blocks) if b.count and not b.checked]
        if todo:
            log(f"checking {sum(b.count for _, b in todo)} clouds of {len(todo)} dataset(s) for "
                f"NaN, huge or flat clouds, once (files written by data_prep.folder skip this)")
        for k, b in todo:
            buf = np.empty((min(chunk, b.count), self.points, 3), self.dtype)
            for start in range(0, b.count, chunk):
                n = min(chunk, b.count - start)
                for j in range(n):
                    self.read(int(self.starts[k]) + start + j, buf[j])
                check_clouds(torch.from_numpy(buf[:n]), f"{b.path} '{b.group}/points'", start)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


@dataclass
class _Slot:
    host: torch.Tensor  # (b, N, 3) stored dtype, pinned when the device is a GPU
    copied: torch.cuda.Event | None = None  # the last copy out of `host` has finished


class HostStream:
    """Each step's clouds for this rank, read on the host `ahead` steps early and copied to the
    device on a side stream. The order is the resident path's: epoch e is
    `epoch_perm(seed, e, S)`, and rank r's share of step s is the r-th `batch // world` of that
    step's global batch."""

    def __init__(self, blocks: list[CloudBlock], batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device, workers: int = 2, ahead: int = 2):
        self.files = CloudFiles(blocks)
        self.global_batch, self.local = batch_size, batch_size // world_size
        self.rank, self.seed, self.device = rank, seed, torch.device(device)
        self.steps_per_epoch = len(self.files) // batch_size
        if self.steps_per_epoch == 0:
            raise BadInput(f"{len(self.files)} clouds are fewer than one batch of {batch_size}")
        self.ahead = max(1, ahead)
        cuda = self.device.type == "cuda"
        shape = (self.local, self.files.points, 3)
        dtype = torch.float16 if self.files.dtype == np.float16 else torch.float32
        self.slots = [_Slot(torch.empty(shape, dtype=dtype, pin_memory=cuda))
                      for _ in range(self.ahead + 1)]
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="pqae-stream")
        self.pending: dict[int, Future] = {}
        self.copies: dict[int, tuple] = {}  # step -> (its device tensor, copy-done event)
        self._perms: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.next = None  # the step batch() expects next
        self.queued = -1  # the last step whose read was queued

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, N, 3), as the resident tensor's."""
        return len(self.files), self.files.points, 3

    def indices(self, step: int) -> np.ndarray:
        """The global cloud indices of this rank's share of `step` (as the resident path's)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        with self._lock:
            if epoch not in self._perms:
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = epoch_perm(self.seed, epoch, len(self.files))
            perm = self._perms[epoch]
        return perm[i * self.global_batch + self.rank * self.local:][:self.local].numpy()

    def _gather(self, step: int) -> _Slot:
        slot = self.slots[step % len(self.slots)]
        if slot.copied is not None:
            slot.copied.synchronize()  # its previous step's copy to the device is done
        out = slot.host.numpy()
        for j, i in enumerate(self.indices(step)):
            self.files.read(int(i), out[j])
        return slot

    def _submit_until(self, last: int) -> None:
        """Queue the reads of every step after those already queued, up to `last`."""
        for s in range(self.queued + 1, last + 1):
            self.pending[s] = self.pool.submit(self._gather, s)
        self.queued = max(self.queued, last)

    def _issue_copy(self, step: int) -> None:
        """Start step's copy to the device (on the side stream) once its clouds are read."""
        slot = self.pending.pop(step).result()
        if self.copy_stream is None:  # CPU: the step reads its own copy (the slot is reused)
            self.copies[step] = (slot.host.float() if slot.host.dtype != torch.float32
                                 else slot.host.clone(), None)
            return
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            dev = torch.empty(slot.host.shape, dtype=slot.host.dtype, device=self.device)
            dev.copy_(slot.host, non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self.copy_stream)
        dev.record_stream(main)  # allocated on the side stream, used on the main one
        self.copies[step] = dev, slot.copied

    def batch(self, step: int) -> torch.Tensor:
        """This rank's clouds of `step`: (batch // world, N, 3) float32 on the device. Steps are
        expected in order; any other step restarts the read-ahead there (a benchmark, a
        resume)."""
        if step != self.next:
            self._drain()
            self.queued = step - 1
        self._submit_until(step + self.ahead)
        if step not in self.copies:
            self._issue_copy(step)
        dev, copied = self.copies.pop(step)
        for s in range(step + 1, step + self.ahead + 1):  # copies of read steps, early
            if s in self.pending and self.pending[s].done():
                self._issue_copy(s)
        if copied is not None:  # the device waits for the copy; the host does not
            torch.cuda.current_stream(self.device).wait_event(copied)
            dev = dev.float()  # widened on the device (half the bytes over PCIe for float16)
        self.next = step + 1
        return dev

    def _drain(self) -> None:
        for f in self.pending.values():
            f.result()
        self.pending.clear()
        self.copies.clear()

    def close(self) -> None:
        self._drain()
        self.pool.shutdown()
        self.files.close()


def fits_on_device(shape: tuple[int, int, int], device: torch.device, processes: int = 1,
                   share: float = 0.25) -> tuple[bool, str]:
    """Whether the resident path's float32 copy of the clouds (S, N, 3) takes at most `share` of
    the device's memory (a GPU's, or the host's RAM split over its `processes`), and why."""
    need = shape[0] * shape[1] * shape[2] * 4
    if device.type == "cuda":
        total, where = torch.cuda.get_device_properties(device).total_memory, f"{device}"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, processes)
        where = "host RAM" + (f" / {processes} processes" if processes > 1 else "")
    ok = need <= share * total
    return ok, (f"{need / 2**30:.2f} GiB as float32 {'<=' if ok else '>'} {share:.0%} of "
                f"{total / 2**30:.1f} GiB ({where})")


def benchmark(path: str, split: str = "all", batch_size: int = 128, steps: int = 50,
              workers: int = 2, ahead: int = 2, device: str = "cpu", seed: int = 0) -> dict:
    """Shapes per second the host path delivers: `steps` batches read through `HostStream`
    (and copied to the device when it is a GPU), after one warm-up batch. Run it twice to
    measure from the page cache."""
    from pqae.data import pretrain_blocks

    stream = HostStream(pretrain_blocks(path, split), batch_size, 0, 1, seed,
                        torch.device(device), workers, ahead)
    steps = min(steps, stream.steps_per_epoch * 10)
    stream.batch(0)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        stream.batch(s)
    if stream.copy_stream is not None:
        torch.cuda.synchronize(stream.device)
    seconds = time.perf_counter() - t0
    stream.close()
    return {"shapes_per_s": round(steps * batch_size / seconds), "steps": steps,
            "batch_size": batch_size, "points": stream.files.points,
            "dtype": str(stream.files.dtype), "workers": workers, "ahead": ahead,
            "MB_per_s": round(steps * batch_size * stream.files.cloud_bytes / seconds / 1e6),
            "device": device}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m pqae.stream",
                                 description="shapes/s of pretraining's host data path")
    ap.add_argument("--data-path", required=True, help="a pretraining .h5, a shard directory, "
                                                       "or several separated by commas")
    ap.add_argument("--split", default="all")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ahead", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    r = benchmark(args.data_path, args.split, args.batch_size, args.steps, args.workers,
                  args.ahead, args.device)
    print(f"host data path: {r['shapes_per_s']} shapes/s ({r['MB_per_s']} MB/s) | batch "
          f"{r['batch_size']} x {r['points']} points {r['dtype']} | {r['workers']} workers, "
          f"{r['ahead']} steps ahead | device {r['device']}")
    print(json.dumps(r))
