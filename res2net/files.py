"""Atomic file writes: a file under its final name is always complete (checkpoints, downloads, data preparation)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TMP_MARK", "atomic_write", "fsync_dir", "remove_stale_temporaries", "temporary_path"]

# Temporary files are hidden siblings of their target: `.<name>.tmp-<pid>`.
TMP_MARK = ".tmp-"


def temporary_path(path: Path) -> Path:
    """The hidden sibling of ``path`` that a write by this process goes to before the rename."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where a directory cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on a clean exit fsync it and rename it over ``path``.

    Any exception (or a crash) leaves the previous ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files a killed write left in ``directory``."""
    for stale in directory.glob(f".*{TMP_MARK}*"):
        with contextlib.suppress(OSError):
            stale.unlink()
