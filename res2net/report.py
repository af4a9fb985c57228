"""Tables the scripts print and write (eval_released, eval_suite, summarize_evals, benchmark): number formatting,
Markdown tables, CSV files, and the tolerance a released checkpoint is judged by."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["fmt", "markdown_table", "tolerance_for", "write_csv"]


def fmt(value: object, digits: int = 3, signed: bool = False) -> str:
    """A table cell: '-' for None, text and integers as they are, floats with ``digits`` decimals (and a sign)."""
    if value is None:
        return "-"
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] | None = None) -> str:
    """A Markdown table; the columns ``right`` (indices) right-aligned, by default all but the first and the last
    (a name first, a status last, numbers between)."""
    n = len(head)
    right = set(range(1, n - 1) if right is None else right)
    align = ["---:" if i in right else "---" for i in range(n)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping]) -> None:
    """``rows`` as CSV with ``columns`` (a missing or None value as an empty cell)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)


def tolerance_for(model: str, given: float | None) -> float:
    """``given``, else the variant's own tolerance (res2net.models.variants), else the default."""
    from res2net.models.variants import DEFAULT_TOLERANCE, VARIANTS

    if given is not None:
        return given
    return VARIANTS[model].tolerance if model in VARIANTS else DEFAULT_TOLERANCE
