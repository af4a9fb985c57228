"""What train.py and evaluate.py do around Hydra's composition: refuse a misspelt group option and an output folder
that cannot be made (``hydra.run.dir`` / ``hydra.sweep.dir`` under a file or a read-only folder) in one line, join
torchrun's process group (only under torchrun, so a single process never loads torch before it needs it), and end a
second Ctrl-C with one line and ``INTERRUPTED_EXIT_CODE`` instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from res2net.config import RUN_TIME_ENV, check_group_choices
from res2net.engine.stop import INTERRUPTED_EXIT_CODE
from res2net.errors import USAGE_EXIT_CODE, ConfigError, report, run_hydra_main

__all__ = ["check_output_dirs", "run_entry_point"]

_OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def _group_overrides(argv: list[str]) -> list[str]:
    # Flags (--cfg job, -m) and Hydra's own groups (hydra/launcher=..., from plugins) are Hydra's to check.
    return [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]


def check_output_dirs(argv: list[str]) -> None:
    """ConfigError naming an output folder given on the command line that cannot be made: Hydra creates it (and
    writes ``.hydra/`` in it) before the task runs, and fails there with a traceback. The nearest existing folder on
    its path must be a writable folder. Interpolated values (``${now:...}``) are Hydra's to resolve."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if key not in _OUTPUT_KEYS or not sep or not value or "${" in value:
            continue
        existing = Path(value).expanduser().absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{key}={value}: {existing} is a file, not a folder; choose another {key}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: {existing} is not writable by this user; choose another {key}")


def run_entry_point(main: Callable[[], Any], config_dir: str | os.PathLike) -> None:
    """Run a ``@hydra.main`` function ``main`` whose configs live in ``config_dir``."""
    try:
        check_output_dirs(sys.argv[1:])
        check_group_choices(_group_overrides(sys.argv[1:]), Path(config_dir))
    except ConfigError as err:
        report(err)
        raise SystemExit(USAGE_EXIT_CODE) from None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun's ranks join the process group before Hydra composes the config, so rank 0 can hand every
            # rank the launch time that names the run directory (Hydra's own ${now:} would differ between ranks).
            # The task function joins the same group again (a no-op here; a fresh one in a submitit job).
            from res2net.engine import distributed

            with distributed.process_group():
                distributed.share_run_time(RUN_TIME_ENV)
                run_hydra_main(main)
        else:
            run_hydra_main(main)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C): stopped at once, without writing anything new", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
