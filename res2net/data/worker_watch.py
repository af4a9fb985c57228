"""Which file each DataLoader worker is decoding, so that a worker that dies (OOM killer, decoder crash) names it.

torch reports such a death as "DataLoader worker (pid X) exited unexpectedly", without the file. Each worker records
its pid and the sample it is about to decode in a shared-memory ``WorkerTable``; ``crash_error`` turns torch's error
into a ``WorkerCrashError`` naming the dead workers' files, and ``watch_sigchld`` does the same for the error torch's
SIGCHLD handler raises wherever the main thread is (usually the training step).
"""

import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch

__all__ = ["WorkerTable", "WorkerCrashError", "crash_error", "watch_sigchld"]

IDLE = -1
_TABLES: "weakref.WeakSet[WorkerTable]" = weakref.WeakSet()  # tables of open loaders, for the SIGCHLD path


class WorkerCrashError(RuntimeError):
    """A DataLoader worker process died; the message names the file(s) it was decoding."""


class WorkerTable:
    """Per worker (pid, sample index being decoded or -1) in shared memory; ``describe(index)`` names a sample.
    Created in the main process before the workers start, so they inherit it; a worker writes its pid once per
    batch and the sample index before each decode (one store)."""

    def __init__(self, num_workers: int, describe: Callable[[int], str]):
        # RawArray (lock=False): each worker writes only its own slots, the main process reads after a death.
        self._slots = multiprocessing.Array("q", [IDLE] * (2 * num_workers), lock=False)
        self._describe = describe
        _TABLES.add(self)

    def __getstate__(self):  # spawn / forkserver workers: the array travels as shared memory, not as a copy
        return {"_slots": self._slots, "_describe": None}

    def worker_slot(self) -> int | None:
        """In a worker: the offset of its slots, after recording its pid; None in the main process."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        slot = 2 * info.id
        self._slots[slot] = os.getpid()
        return slot

    def busy(self, slot: int, index: int) -> None:
        """In a worker: about to decode sample ``index`` (IDLE: done)."""
        self._slots[slot + 1] = index

    def snapshot(self) -> list[tuple[int, int]]:
        """[(pid or -1 before the worker started, sample index or -1 when idle)] per worker id."""
        values = list(self._slots)
        return list(zip(values[0::2], values[1::2], strict=True))

    def dead_workers(self) -> list[tuple[int, int, int, str]]:
        """(worker id, pid, sample index or -1, how it ended) of every recorded worker that has exited."""
        dead = []
        for worker, (pid, index) in enumerate(self.snapshot()):
            if pid > 0:
                ended = _exit_status(pid)
                if ended is not None:
                    dead.append((worker, pid, index, ended))
        return dead

    def close(self) -> None:
        _TABLES.discard(self)


def _exit_status(pid: int) -> str | None:
    """None while child ``pid`` runs; else how it ended ('' once already reaped). Leaves a zombie unreaped."""
    if not hasattr(os, "waitid"):  # e.g. macOS: cannot tell a zombie from a live process
        try:
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return ""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already (torch's is_alive() polls reap it): gone, status unknown
        return ""
    if info is None:
        return None
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return f"killed by signal {signal.Signals(info.si_status).name}"
    return f"exit code {info.si_status}"


def crash_error(
    err: BaseException, tables: Sequence[WorkerTable] | None = None, grace_s: float = 0.0
) -> WorkerCrashError | None:
    """The error naming what the dead workers of ``tables`` (default: every open loader's) were decoding; None when
    no recorded worker has died within ``grace_s`` (``err`` is then some other failure). The grace covers a
    worker killed while sending a batch: the main process sees the broken connection before the worker has
    finished exiting."""
    named = _named_in_chain(err)
    if named is not None:  # torch caught the SIGCHLD path's error in next() and raised its own from it
        return WorkerCrashError(str(named))
    tables = list(_TABLES) if tables is None else tables
    deadline = time.monotonic() + grace_s
    dead = [(table, d) for table in tables for d in table.dead_workers()]
    while not dead and time.monotonic() < deadline:
        time.sleep(0.01)
        dead = [(table, d) for table in tables for d in table.dead_workers()]
    parts = []
    for table, (worker, pid, index, ended) in dead:
        who = f"DataLoader worker {worker} (pid {pid}{', ' + ended if ended else ''})"
        if index == IDLE:
            parts.append(f"{who} died while idle, between samples (it was decoding no file)")
        else:
            parts.append(f"{who} died while decoding {table._describe(index)}")
    if not parts:
        return None
    hints = [
        "SIGKILL usually means the out-of-memory killer (see `dmesg`; lower data.num_workers, data.prefetch or "
        "data.batch_size)"
    ]
    if any(index != IDLE for _, (_, _, index, _) in dead):
        hints.append("a decoder crash (e.g. SIGSEGV) points to the file: check it with scripts/check_dataset.py")
    return WorkerCrashError(f"{'; '.join(parts)}. {'; '.join(hints)}. torch said: {str(err).strip()}")


def _named_in_chain(err: BaseException | None) -> WorkerCrashError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, WorkerCrashError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def watch_sigchld() -> None:
    """Make torch's SIGCHLD handler raise ``crash_error`` instead of its own message (once per process; call after
    a DataLoader iterator with workers exists, i.e. after torch installed its handler; main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous) or getattr(previous, "_res2net_watch", False):
        return

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as err:
            crash = None if isinstance(err, WorkerCrashError) else crash_error(err)
            if crash is None:
                raise
            raise crash from err

    handler._res2net_watch = True
    signal.signal(signal.SIGCHLD, handler)
