"""Preemption: SIGTERM / SIGUSR1 become a request to stop at the next step boundary after writing a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["PREEMPTED_EXIT_CODE", "StopRequest"]

# sysexits.h EX_TEMPFAIL: "temporary failure, retry". A preempted run exits with it after writing last.pth.
PREEMPTED_EXIT_CODE = 75


class StopRequest:
    """Records SIGTERM / SIGUSR1 (SLURM's warning signal) so the loop can stop at a step boundary and checkpoint.

    Once a stop is pending, further SIGTERM / SIGUSR1 are ignored and only counted in ``repeats``: on SLURM a
    preemption signals every process of the job step and torchrun forwards its own copy, so a worker routinely gets
    the signal twice and must still write its checkpoint. To end a run without a checkpoint send SIGINT (Ctrl-C) or
    SIGKILL. Leaving the ``with`` block restores the previous handlers, so a caller that exits after a stop
    (train.py) keeps the block open until then.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.signum: int | None = None
        self.repeats = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        else:  # a checkpoint is pending: a repeat must not kill the process before it is written
            self.repeats += 1

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
