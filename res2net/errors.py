"""Errors a user can act on, and how the entry points report them: one ``error: ...`` line and a documented exit code.

Exit codes of train.py, evaluate.py and scripts/*.py:

- 0: success.
- 1: a failure at run time (a missing, unreadable or corrupt file, a checkpoint that does not fit, missing data, a
  locked run directory, a non-finite loss, a dead DataLoader worker); also any unexpected exception (a bug), which
  keeps its traceback.
- 2: a usage or config error (a value the run cannot use, a bad Hydra override), found at start-up.
- 75: train.py stopped by SIGTERM / SIGUSR1 after writing its checkpoint (``res2net.engine.stop``).

``HYDRA_FULL_ERROR=1`` prints the traceback of a reported error as well (the exit code stays the same).
Imports nothing beyond the standard library, so ``res2net.models`` keeps importing with torch alone.
"""

from __future__ import annotations

import dis
import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DEBUG_ENV",
    "FAILURE_EXIT_CODE",
    "UnsafeCheckpointError",
    "USAGE_EXIT_CODE",
    "exit_code",
    "hydra_entry",
    "report",
    "run_hydra_main",
    "run_script",
]

FAILURE_EXIT_CODE = 1
USAGE_EXIT_CODE = 2
DEBUG_ENV = "HYDRA_FULL_ERROR"

# Where "the project's own code" lives: an error its `raise` statements raise carries a message for the user and is
# reported in one line; the same exception type raised inside torch, numpy or a builtin is a bug and keeps its
# traceback.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_RUNTIME_TYPES = (RuntimeError, OSError, ImportError)


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key, the value and what is allowed."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that only Python's full unpickler reads: loading it can run arbitrary code, so it is refused
    unless the caller opts in (``res2net.load_pretrained(..., trusted=True)``, ``evaluate.py trust_checkpoint=true``).
    """


def _raised_in_project(err: BaseException) -> bool:
    """Whether a ``raise`` statement in the project's code raised ``err`` (not a call into a library or builtin
    that failed: ``open()`` of a missing file, a tensor op with a wrong shape)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    file = Path(code.co_filename).resolve()
    if not file.is_relative_to(_PROJECT_ROOT) or "site-packages" in file.parts or ".venv" in file.parts:
        return False
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))


def _is_omegaconf_error(err: BaseException) -> bool:
    errors = sys.modules.get("omegaconf.errors")  # never imported here: only a process that uses OmegaConf has them
    return errors is not None and isinstance(err, errors.OmegaConfBaseException)


def exit_code(err: BaseException) -> int | None:
    """The exit code of a user error (see the module docstring); None for a bug, which keeps its traceback."""
    if isinstance(err, CheckpointError):
        return FAILURE_EXIT_CODE
    if isinstance(err, ConfigError) or _is_omegaconf_error(err):
        return USAGE_EXIT_CODE
    if not _raised_in_project(err):
        return None
    if isinstance(err, ValueError):
        return USAGE_EXIT_CODE
    if isinstance(err, _RUNTIME_TYPES):
        return FAILURE_EXIT_CODE
    return None


def report(err: BaseException) -> None:
    """Print ``error: <message>`` (its further lines are hints or a key report) to stderr; with HYDRA_FULL_ERROR=1
    the traceback first."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(err)
    print(f"error: {str(err) or type(err).__name__}", file=sys.stderr, flush=True)


_task_started = False


def hydra_entry(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function (beneath ``@hydra.main``): a user error ends the process with ``report`` and
    its exit code; other exceptions go on to Hydra, which prints their traceback."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        global _task_started
        _task_started = True
        try:
            return task(*args, **kwargs)
        except Exception as err:
            code = exit_code(err)
            if code is None:
                raise
            report(err)
            raise SystemExit(code) from None

    return run


def run_hydra_main(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function. Hydra itself reports an error found before the task function runs (a bad
    override, a misspelt group option) and exits 1; that becomes the usage error's exit code 2."""
    try:
        main()
    except SystemExit as done:
        if done.code == FAILURE_EXIT_CODE and not _task_started:
            raise SystemExit(USAGE_EXIT_CODE) from None
        raise
    except Exception:
        if _task_started:
            raise
        traceback.print_exc()  # HYDRA_FULL_ERROR=1: Hydra re-raised its composition error
        raise SystemExit(USAGE_EXIT_CODE) from None


def run_script(main: Callable[[], int | None]) -> int | None:
    """Call a script's ``main()`` and return its exit status; a user error is reported in one line instead."""
    try:
        return main()
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        report(err)
        return code
