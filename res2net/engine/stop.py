"""Stopping a run cleanly: SIGTERM / SIGUSR1 (preemption) and the first SIGINT (Ctrl-C) become a request to stop at
the next step boundary after writing a checkpoint; a second SIGINT aborts at once.

Imports only the standard library: train.py installs the handlers (``install``) as its first statement, before torch
and Hydra load, so a signal that arrives during start-up is a stop request too, not the default "killed by signal".
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["INTERRUPTED_EXIT_CODE", "PREEMPTED_EXIT_CODE", "StopRequest", "exit_code_for", "install"]

# sysexits.h EX_TEMPFAIL: "temporary failure, retry". A preempted run exits with it after writing last.pth.
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, the shell's code for Ctrl-C: a run the user stopped (with last.pth after the first Ctrl-C, without a
# new checkpoint after a second one). Not 75, so a requeue-on-75 wrapper does not restart a run stopped on purpose.
INTERRUPTED_EXIT_CODE = 130


class StopRequest:
    """Records SIGTERM / SIGUSR1 (SLURM's warning signal) and SIGINT so the loop can stop at a step boundary and
    checkpoint.

    Once a stop is pending, further SIGTERM / SIGUSR1 are ignored and only counted in ``repeats``: on SLURM a
    preemption signals every process of the job step and torchrun forwards its own copy, so a worker routinely gets
    the signal twice and must still write its checkpoint. A second SIGINT (Ctrl-C pressed again) raises
    KeyboardInterrupt: the run ends at once without a new checkpoint. ``signum`` is the first signal received.
    Leaving the ``with`` block restores the previous handlers, so a caller that exits after a stop (train.py) keeps the
    block open until then.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))

    def __init__(self):
        self.signum: int | None = None
        self.repeats = 0
        self.interrupts = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from the user (SIGINT) rather than the scheduler (SIGTERM / SIGUSR1)."""
        return self.signum == signal.SIGINT

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # Ctrl-C again: the user does not want to wait for the checkpoint
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
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


_process_request: StopRequest | None = None


def install() -> StopRequest:
    """The process's StopRequest, its handlers installed on the first call and kept until the process exits."""
    global _process_request
    if _process_request is None:
        _process_request = StopRequest().__enter__()
    return _process_request


def exit_code_for(request: StopRequest) -> int:
    """The exit code of a run that stopped at ``request`` after writing its checkpoint."""
    return INTERRUPTED_EXIT_CODE if request.interrupted else PREEMPTED_EXIT_CODE
