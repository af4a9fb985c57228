"""One writer per run directory: an exclusive POSIX record lock (``fcntl.lockf``) on ``<run dir>/.lock``, taken by
train.py's rank 0 before it reads or writes a checkpoint, and by evaluate.py's rank 0 for its output directory.

Why a POSIX record lock and not ``flock``: a flock belongs to the open file description, which ``fork`` shares with
the child, so a DataLoader worker (or any forked helper) kept a SIGKILLed train.py's lock alive until it noticed its
parent was gone, and an immediate ``resume=auto`` was refused as "in use". A record lock belongs to the process: a
child never inherits it, whatever way it was forked (Python's ``os.fork``, a C library's ``fork()``), and the kernel
drops it the moment its holder exits, however it ends. The descriptor is also close-on-exec, so no exec'd program
holds the file open. Two properties of record locks are handled here: a second lock by the same process would be
granted (so this process's own locks are remembered and a second one is refused the same way), and closing *any*
descriptor of the file drops the process's lock (so nothing here opens the file again while it is held). Record locks
work on local file systems and on NFS (through the NFS lock manager); on a file system without locks the lock is
refused with its error. The lock file stays in place (removing it would race with a new holder) and holds the pid,
host and start time of the latest holder, for the message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirLockedError", "output_dir_lock", "run_dir_lock"]

LOCK_FILE = ".lock"

# This process's held locks: resolved lock path -> its descriptor (see the module docstring for why).
_held: dict[Path, int] = {}


def _forget_in_child() -> None:
    _held.clear()  # a forked child holds none of its parent's record locks


os.register_at_fork(after_in_child=_forget_in_child)


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def _holder(fd: int) -> str:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return text or "a process that has not written its pid yet"


def _refusal(run_dir: Path, fd: int, user: str, hint: str) -> RunDirLockedError:
    return RunDirLockedError(
        f"run directory {run_dir} is in use by another {user} ({_holder(fd)}); its files were not touched.\n{hint}"
    )


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, user: str = "train.py", hint: str | None = None) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` exclusively for the ``with`` block (creating the directory if needed). ``user`` and
    ``hint`` word the refusal: who else may hold it and what to do."""
    run_dir = Path(run_dir)
    if hint is None:
        hint = (
            f"Wait for it to end or stop it, then continue with hydra.run.dir={run_dir} resume=auto, or pick another "
            "hydra.run.dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = path.resolve()
    if key in _held:
        raise _refusal(run_dir, _held[key], user, hint)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise _refusal(run_dir, fd, user, hint) from None
        _held[key] = fd
        try:
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode(), 0)
            yield path
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock


def output_dir_lock(out_dir: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """evaluate.py's lock on its output directory: a second evaluation there is refused at start-up, before it
    evaluates anything, instead of both writing results.json and one result being lost."""
    return run_dir_lock(
        out_dir,
        user="evaluate.py",
        hint=f"Wait for it to end, or give this evaluation its own directory (hydra.run.dir=<another dir> instead "
        f"of {out_dir})",
    )
