"""One run per directory: an exclusive lock on a run's --out-dir for the life of the run.

The lock is `OUT_DIR/.lock`, held with flock(2) by global rank 0 from before anything is
read or written until the run ends. The kernel drops it when the process dies, however it
dies (SIGKILL included), so a lock left by a dead process is simply taken over; the file
names the holder (host, pid, start time, command), which the refusal and the takeover note
show. A second run in the same directory refuses at once, naming the holder.

Where flock is not supported (some network file systems answer ENOLCK), the holder recorded
in the file decides instead: a live process on this host, or any process on another host,
holds the directory; a dead process on this host does not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pqae.errors import BadInput, WriteFailed

NAME = ".lock"
_held: dict[Path, tuple[int, Path | None]] = {}  # directory -> (the open file holding its
# lock, the highest directory acquire created on the way, if any) in this process


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "a process that left no record"
    return (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
            f"{h.get('command', '?')}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(out_dir: str | Path) -> str | None:
    """Take the lock of `out_dir` (created if needed) for this process; re-entrant within the
    process. Returns a note when it took over the lock of a process that is gone, else None.
    Raises BadInput when another run holds it, WriteFailed when the directory is not writable."""
    out_dir = Path(out_dir)
    path = out_dir / NAME
    created = None
    for parent in [out_dir, *out_dir.absolute().parents]:
        if parent.exists():
            break
        created = parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if out_dir.resolve() in _held:
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteFailed(f"cannot write to --out-dir {out_dir}: {e.strerror or e}. Give a "
                          f"directory this user can write to") from None
    key = out_dir.resolve()
    before = _holder(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise BadInput(f"{out_dir} is in use by another run ({_describe(before)}). Wait for "
                           f"it to end, or give this run another --out-dir") from None
        if e.errno != errno.ENOLCK:
            os.close(fd)
            raise
        # no flock here: the record decides
        if before and (before.get("host") != socket.gethostname()
                       or _alive(int(before.get("pid", 0)))) and before.get("pid") != os.getpid():
            os.close(fd)
            raise BadInput(f"{out_dir} is in use by another run ({_describe(before)}; this file "
                           f"system has no flock, so the record {path} decides). If that run is "
                           f"gone, delete {path}") from None
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as e:
        os.close(fd)
        raise WriteFailed(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None
    _held[key] = (fd, created)
    if before and before.get("pid") not in (None, os.getpid()):
        return f"took over the lock of {out_dir} from a run that is gone ({_describe(before)})"
    return None


def release(out_dir: str | Path) -> None:
    """Drop this process's lock of `out_dir` (a no-op when it holds none). The file stays,
    emptied (a record names a holder only while it runs or after it died), unless the run
    created the directory and wrote nothing else in it: a run refused at its start leaves
    nothing behind."""
    key = Path(out_dir).resolve()
    fd, created = _held.pop(key, (None, None))
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # an empty record: no holder (the next run takes over nothing)
    except OSError:
        pass
    os.close(fd)  # closing the only descriptor releases the flock
    if created is not None:
        try:
            if [p.name for p in key.iterdir()] == [NAME]:
                (key / NAME).unlink()
                for d in [key, *key.parents]:  # the empty directories acquire made
                    d.rmdir()
                    if d == created.resolve():
                        break
        except OSError:
            pass


def release_all() -> None:
    for key in list(_held):
        release(key)
