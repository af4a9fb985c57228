#!/usr/bin/env python
"""Summarize evaluate.py runs, e.g. a test-resolution sweep: a table of the runs and top-1 against test resolution.

    python evaluate.py -m checkpoint=<ckpt> data.root=<root> data.img_size=224,256,288 data.crop_pct=0.875,0.95,1.0
    python scripts/summarize_evals.py multirun/<date>/<time> [--out-dir DIR]

Every results.json under the directory is a run. Writes, beside them or to --out-dir:

- ``evals.md``: one row per run (model, set, img_size, crop_pct, interpolation, tta, top-1, top-5, ECE, NLL, images)
  and, per model and set, a grid of top-1 by test resolution (rows) and crop_pct (columns);
- ``evals.csv``: the rows;
- ``evals.png``: top-1 against test resolution, one line per model, set and crop_pct.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from res2net.report import fmt, markdown_table, write_csv  # noqa: E402

RESULTS_FILE = "results.json"
COLUMNS = (
    "run",
    "model",
    "dataset",
    "img_size",
    "crop_pct",
    "interpolation",
    "tta",
    "top1",
    "top5",
    "ece",
    "nll",
    "count",
)
_NUMERIC = ("img_size", "crop_pct", "top1", "top5", "ece", "nll", "count")


def read_runs(sweep: Path) -> list[dict]:
    """One row per results.json under ``sweep``, sorted by model, set, crop_pct and img_size."""
    rows = []
    for path in sorted(sweep.rglob(RESULTS_FILE)):
        out = json.loads(path.read_text())
        data = out["config"]["data"]
        rows.append(
            {
                "run": str(path.parent.relative_to(sweep)) or ".",
                "model": out["model"],
                "dataset": out.get("dataset", "imagenet"),
                "img_size": data["img_size"],
                "crop_pct": data["crop_pct"],
                "interpolation": data["interpolation"],
                "tta": out["config"].get("tta", "none"),
                "top1": out["top1"],
                "top5": out["top5"],
                "ece": out.get("ece"),
                "nll": out.get("nll", out["loss"]),
                "count": out["count"],
            }
        )
    if not rows:
        raise FileNotFoundError(
            f"no {RESULTS_FILE} under {sweep}; pass the directory of an evaluate.py run or "
            f"sweep (evaluate.py -m writes multirun/<date>/<time>/<job>/{RESULTS_FILE})"
        )
    return sorted(rows, key=lambda r: (r["model"], r["dataset"], r["tta"], r["crop_pct"], r["img_size"], r["run"]))


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (model, set, tta), in order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"], r["tta"]), []).append(r)
    return groups


def grid(rows: list[dict]) -> list[str]:
    """Markdown grid of top-1: one row per img_size, one column per crop_pct."""
    sizes, crops = sorted({r["img_size"] for r in rows}), sorted({r["crop_pct"] for r in rows})
    top1 = {(r["img_size"], r["crop_pct"]): r["top1"] for r in rows}
    head = ["img_size", *(f"crop {c}" for c in crops)]
    cells = [[str(s), *(fmt(top1.get((s, c))) for c in crops)] for s in sizes]
    return markdown_table(head, cells, right=range(len(head))).split("\n")


def markdown(rows: list[dict]) -> str:
    cells = [[fmt(r[c], 4 if c in ("ece", "nll") else 3) for c in COLUMNS] for r in rows]
    lines = [markdown_table(COLUMNS, cells, right=[i for i, c in enumerate(COLUMNS) if c in _NUMERIC])]
    for (model, dataset, tta), group in _series(rows).items():
        lines += ["", f"Top-1 of {model} on {dataset} (tta {tta}) by test resolution and crop:", "", *grid(group)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, dataset, tta), group in _series(rows).items():
        for crop in sorted({r["crop_pct"] for r in group}):
            points = sorted((r["img_size"], r["top1"]) for r in group if r["crop_pct"] == crop)
            label = f"{model} / {dataset} / crop {crop}" + ("" if tta == "none" else f" / tta {tta}")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("test resolution (data.img_size, px)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(sweep: Path, out_dir: Path | None = None) -> tuple[Path, Path, Path]:
    rows = read_runs(sweep)
    out_dir = out_dir or sweep
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out_dir / "evals.md", out_dir / "evals.csv", out_dir / "evals.png"
    md.write_text(markdown(rows))
    write_csv(csv_path, COLUMNS, rows)
    plot(rows, png)
    return md, csv_path, png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", type=Path, help="directory holding evaluate.py runs (results.json files)")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write (default: the sweep directory)")
    args = p.parse_args(argv)
    try:
        paths = summarize(args.sweep, args.out_dir)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"summarize_evals.py: error: {err}", file=sys.stderr)
        return 2
    print(paths[0].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
