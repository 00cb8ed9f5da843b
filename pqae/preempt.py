"""Preemption: a cluster ends a job politely before it ends it hard.

SIGTERM (SLURM and Kubernetes before the kill; torchrun forwards it to its workers), SIGINT
(Ctrl-C) and SIGUSR1 (SLURM's `--signal`) only set a flag here. The training loop asks
`Run.stopping(step)` at every step boundary; the ranks agree there (one all-reduce on a CPU
group), rank 0 writes ckpt-last, every rank waits for it, and the process exits with status
`STATUS` (75, EX_TEMPFAIL: "try again") after one line saying how to resume. A second signal
while that happens is noted and changes nothing; a third ends the process at once (the
checkpoint writes are atomic, so even that loses only the step in flight).
"""

from __future__ import annotations

import os
import signal
import threading

STATUS = 75
"""exit status of a preempted run (sysexits' EX_TEMPFAIL)."""

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(SystemExit):
    """Raised after a preempted run saved and every rank met: exit status STATUS."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(STATUS)
        self.message, self.signal = message, signal_name


class _Flag:
    def __init__(self):
        self.signal: str | None = None  # the first signal received
        self.count = 0
        self.holders = 0
        self.previous: dict[int, object] = {}
        self.verbose = True

    def handle(self, signum: int, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= 3:
            os.write(2, f"\n{name} a third time: stopping now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        if self.signal is None:
            self.signal = name
            text = f"\n{name}: saving ckpt-last at the end of this step, then stopping\n"
        else:
            text = f"\n{name}: already stopping at the end of this step (a third signal ends now)\n"
        if self.verbose:  # os.write: a handler may interrupt a print
            os.write(2, text.encode())


_flag = _Flag()


def hold(verbose: bool = True) -> None:
    """Catch the preemption signals (from the main thread; re-entrant: `release` as often)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _flag.holders == 0:
        _flag.signal, _flag.count, _flag.verbose = None, 0, verbose
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                _flag.previous[sig] = signal.signal(sig, _flag.handle)
    _flag.holders += 1


def release() -> None:
    """Undo one `hold`; the last one puts the previous handlers back."""
    if _flag.holders == 0:
        return
    _flag.holders -= 1
    if _flag.holders == 0:
        for sig, handler in _flag.previous.items():
            signal.signal(sig, handler)
        _flag.previous.clear()


def release_all() -> None:
    while _flag.holders:
        release()


def consume() -> None:
    """The stop a signal asked for happened: forget it (a run started later in this process
    does not stop at its first step)."""
    _flag.signal, _flag.count = None, 0


def received() -> str | None:
    """The name of the first preemption signal since `hold`, or None."""
    return _flag.signal
