"""A val split carved out of a folder that has only ``train/`` (``data.val_split``): deterministic and stratified.

Each class's images are ranked by the SHA-256 of their path relative to ``<root>/train`` and the first
``round(fraction * n)`` go to val (at least one when the class has two or more images, never all of them). The
choice depends only on the file names, not on a seed, the machine or the world size, so train.py, evaluate.py and
scripts/predict.py recompute the same split from the same folder; train.py also records it in the run directory
(``split.json``: the fraction and the val files) for the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SPLIT_FILE",
    "class_counts",
    "describe_data",
    "split_samples",
    "split_val_files",
    "summary_lines",
    "write_split",
]

SPLIT_FILE = "split.json"

log = logging.getLogger(__name__)


def _rank_key(path: str, train_dir: str) -> str:
    return hashlib.sha256(os.path.relpath(path, train_dir).replace(os.sep, "/").encode()).hexdigest()


def split_samples(
    samples: Sequence[tuple[str, int]], fraction: float, train_dir: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train part, val part) of ``samples`` ([(path, label)], paths under ``train_dir``), each in the input order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_split={fraction} must be a fraction in (0, 1)")
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    val: set[str] = set()
    for paths in by_class.values():
        n = len(paths)
        take = min(max(round(fraction * n), 1 if n >= 2 else 0), n - 1)
        val.update(sorted(paths, key=lambda p: _rank_key(p, train_dir))[:take])
    return [s for s in samples if s[0] not in val], [s for s in samples if s[0] in val]


def class_counts(samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(label for _, label in samples)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}


def summary_lines(
    classes: Sequence[str], train: Sequence[tuple[str, int]], val: Sequence[tuple[str, int]]
) -> list[str]:
    """The start-up summary: number of classes, images per split, and per class (the first 20)."""
    tr, va = class_counts(train, classes), class_counts(val, classes)
    lines = [f"{len(classes)} classes, {len(train)} train / {len(val)} val images"]
    shown = list(classes)[:20]
    lines += [f"  {name}: {tr[name]} train, {va[name]} val" for name in shown]
    if len(classes) > len(shown):
        lines.append(f"  ... ({len(classes) - len(shown)} more classes)")
    return lines


def write_split(run_dir: str | os.PathLike, fraction: float, train_dir: str, classes: Sequence[str], val) -> Path:
    """``<run_dir>/split.json``: the fraction, the classes and the val files (relative to train/), per class."""
    path = Path(run_dir) / SPLIT_FILE
    record = {
        "val_split": fraction,
        "train_dir": str(train_dir),
        "classes": list(classes),
        "val": sorted(os.path.relpath(p, train_dir).replace(os.sep, "/") for p, _ in val),
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def split_val_files(path: str | os.PathLike) -> list[str]:
    """The val images a ``split.json`` records, as paths under its train_dir (sorted as recorded). ValueError for a
    file that is not such a record or names a path outside train_dir; FileNotFoundError when images are missing
    (the folder moved or changed since the run)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        train_dir, val = record["train_dir"], record["val"]
        if not isinstance(train_dir, str) or not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            raise TypeError
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a split record written by train.py (train_dir, val): {err!r}") from None
    escaping = [v for v in val if os.path.isabs(v) or ".." in Path(v).parts]
    if escaping:
        raise ValueError(f"{path} names a file outside its train_dir: {escaping[0]!r}")
    files = [os.path.join(train_dir, *v.split("/")) for v in val]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} of its {len(files)} val images are not under {train_dir} (first: {missing[0]}); "
            "the folder moved or changed since the run"
        )
    return files


def describe_data(data_cfg: Any, run_dir: str | os.PathLike) -> None:
    """Log the start-up summary of a folder data set (classes and image counts per split) and, with
    data.val_split, record the split in ``<run_dir>/split.json``. Skipped for the synthetic backend and for folders
    of more than 100 classes without val_split (ImageNet: the scan would cost start-up time for a long list)."""
    from .index import class_folders, scan_split

    if data_cfg.backend == "synthetic" or not data_cfg.root:
        return
    train_dir = os.path.join(data_cfg.root, "train")
    if data_cfg.val_split <= 0 and len(class_folders(train_dir)) > 100:
        return
    samples, classes = scan_split(data_cfg.root, "train")
    if data_cfg.val_split > 0:
        train, val = split_samples(samples, data_cfg.val_split, train_dir)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        where = write_split(run_dir, data_cfg.val_split, train_dir, classes, val)
        log.info(
            "data.val_split=%g: %d of %d images held out for val, recorded in %s",
            data_cfg.val_split,
            len(val),
            len(samples),
            where,
        )
    else:
        train = samples
        val = scan_split(data_cfg.root, "val", classes)[0] if os.path.isdir(os.path.join(data_cfg.root, "val")) else []
    for line in summary_lines(classes, train, val):
        log.info("%s", line)
