"""Distributed setup for torchrun (single process, one GPU, many GPUs, many nodes)."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun (RANK set), else single process.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". NCCL on CUDA, gloo on CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        # One group for the life of the process: a group re-created after a destroy would read
        # the old group's stale addresses from torchrun's store and hang, so a script's main()
        # run twice in one job (fewshot.py's folds) reuses this one instead.
        atexit.register(_shutdown)
    global _finished
    _finished = False  # a main() is running: its ranks may be inside collectives
    return Dist(rank, local_rank, world, dev)


_finished = False
"""True between the end of a main() (`cleanup`, which every rank reached) and the next setup."""


def cleanup() -> None:
    """End of a script's main(): the ranks meet here, so none exits (and tears down its gloo
    threads) while a peer is still working. The group itself lives until the process exits."""
    global _finished
    if dist.is_initialized():
        dist.barrier()
        _finished = True


def _shutdown() -> None:
    """At process exit: when every rank finished its main(), meet once more, so no rank
    destroys the group while a peer is still running the caller's last local work (a rank
    that tore down its gloo threads first was seen to abort at exit); then destroy it. After
    an error no rank waits: torchrun stops the others."""
    if not dist.is_initialized():
        return
    try:
        if _finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place), a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_buffers(model) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating: DDP
    broadcasts buffers only at the start of a forward, and each rank then updates them on its
    own batch, so without this the ranks would evaluate slightly different models."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous slice of n evaluation samples that `rank` handles: every sample is in
    exactly one rank's slice (no padding, no duplicates), sizes differ by at most one."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def barrier() -> None:
    """All ranks meet here (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
