"""One writer per run directory: an exclusive ``flock`` on ``<run dir>/.lock``, taken by train.py's rank 0 before it
reads or writes a checkpoint.

The kernel releases the lock when its holder exits however it ends (SIGKILL, preemption, a crash), so a killed run
never blocks its own ``resume=auto``; a second train.py on a directory whose holder is alive exits at once with
``RunDirLockedError`` naming the holder. The lock file stays in place (removing it would race with a new holder) and
holds the pid, host and start time of the latest holder, for the message. flock works on local file systems and on
NFS (Linux emulates it with NFS byte-range locks); on a file system without locks the lock is refused with its error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirLockedError", "run_dir_lock"]

LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "a process that has not written its pid yet"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` exclusively for the ``with`` block (creating the directory if needed)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(
                f"run directory {run_dir} is in use by another train.py ({_holder(fd)}); its checkpoints were not "
                f"touched.\nWait for it to end or stop it, then continue with hydra.run.dir={run_dir} resume=auto, or "
                "pick another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
