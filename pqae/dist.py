"""Distributed setup for torchrun (single process, one GPU, many GPUs, many nodes)."""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
import sys
import time
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


def setup(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Initialise the process group when launched by torchrun (RANK set), else single process.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". NCCL on CUDA, gloo on CPU.
    timeout_s: how long a collective waits for the other processes before it fails (torch's
    default is 30 minutes); `cli.run` then names the ranks that did not answer
    (`handle_timeout`). With NCCL, torch's watchdog ends the process at that timeout.
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
                                device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
        global _timeout_s
        _timeout_s = timeout_s
        _store().set(f"pqae/proc/{rank}", f"{socket.gethostname()} {os.getpid()}")
        global _cpu_group  # host-side agreement (preemption) without a device sync
        _cpu_group = dist.new_group(backend="gloo") if dev.type == "cuda" else None
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


def ddp(model: torch.nn.Module, env: Dist) -> torch.nn.Module:
    """The module a training step calls: the model in DistributedDataParallel under torchrun
    (which averages the gradients over the processes), else the model itself."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


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


_cpu_group = None
"""A gloo group beside NCCL's, for flags the hosts agree on (None: the default group is gloo)."""


def agree_any(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce of one integer on the
    host; no device synchronisation). Every rank must call it at the same point."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(t.item())


def barrier() -> None:
    """All ranks meet here (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


_timeout_s = 600.0


def _store():
    return dist.distributed_c10d._get_default_store()


def is_timeout(e: BaseException) -> bool:
    """An exception from a collective that waited for a peer past the timeout."""
    text = f"{type(e).__name__} {e}".lower()
    return dist.is_initialized() and ("timed out" in text or "timeout" in text)


def unresponsive_ranks(grace_s: float = 5.0) -> list[int]:
    """Roll call through the rendezvous store (hosted by torchrun's agent, not by a rank): each
    rank that can still run answers; those that have not answered after `grace_s` are
    stopped, hung or dead."""
    rank, world = dist.get_rank(), dist.get_world_size()
    store = _store()
    store.set(f"pqae/alive/{rank}", "1")
    deadline = time.monotonic() + grace_s
    keys = [f"pqae/alive/{r}" for r in range(world)]
    while time.monotonic() < deadline and not store.check(keys):
        time.sleep(0.1)
    return [r for r in range(world) if not store.check([f"pqae/alive/{r}"])]


def handle_timeout(e: BaseException) -> bool:
    """If `e` is a collective's timeout: name the ranks that did not answer, stop (SIGKILL)
    those that run on this host so that the job ends now (torchrun would wait 30 s more for a
    stopped process), and return True; else False."""
    if not is_timeout(e):
        return False
    try:
        missing = unresponsive_ranks()
    except Exception:  # the store itself is gone: say what we know
        missing = []
    me = dist.get_rank()
    who = (f"rank(s) {missing} did not answer (stopped, hung or dead)" if missing else
           "the rank that failed to answer could not be determined")
    print(f"error: rank {me}: a collective waited {_timeout_s:g} s (--collective-timeout) for "
          f"the other processes; {who}. Stopping the job; `--resume` continues from the last "
          f"checkpoint.", file=sys.stderr, flush=True)
    for r in missing:
        try:
            host, pid = _store().get(f"pqae/proc/{r}").decode().split()
            if host == socket.gethostname():
                os.kill(int(pid), signal.SIGKILL)
        except Exception:
            pass
    return True
