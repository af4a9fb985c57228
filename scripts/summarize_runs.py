"""Summarize a sweep: one table row and one set of curves per run.

    python scripts/summarize_runs.py multirun/2026-01-01/12-00-00 [--out-dir DIR]

Every directory under the sweep directory that holds a ``metrics.jsonl`` is a run (``python train.py -m ...`` writes
one per job). From each run it reads the "epoch" records of ``metrics.jsonl``, the Hydra overrides
(``.hydra/overrides.yaml``) and the resolved ``config.yaml``, and writes beside them (or to ``--out-dir``):

- ``summary.md`` and ``summary.csv``: the overridden knobs, best and final top-1 / top-5, epochs done, median img/s,
  wall time (the sum of the epochs' times) and GPU-hours (processes x wall time; runs on CPU are marked as such and
  count no GPU-hours). The number of processes and the device come from the "epoch" records (``world_size``,
  ``device``), epoch by epoch;
- ``summary.png``: validation top-1 per epoch and train / val loss per epoch of every run.

Epochs are counted from 1 here (metrics.jsonl counts from 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from res2net.errors import run_script  # noqa: E402

METRICS_FILE = "metrics.jsonl"
MISSING = "-"


@dataclass
class Run:
    name: str  # path relative to the sweep directory
    path: Path
    overrides: dict[str, str]
    config: dict
    epochs: list[dict]  # one "epoch" record per epoch number, in epoch order
    hardware: list[tuple[int, str]] | None = None  # (world_size, device) of each epoch; None when not logged
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    runs: list[Run]
    columns: list[str]
    rows: list[dict]
    markdown: str
    markdown_path: Path
    csv_path: Path
    png_path: Path
    figure: Figure


def natural_key(text: str) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory '{sweep_dir}' does not exist or is not a directory")
    run_dirs = {
        path.parent
        for path in sweep_dir.rglob(METRICS_FILE)
        if not any(part.startswith(".") for part in path.relative_to(sweep_dir).parts)
    }
    if not run_dirs:
        raise FileNotFoundError(
            f"no run directories (folders with a {METRICS_FILE}) under '{sweep_dir}': pass the sweep directory "
            f"that holds the jobs' folders, e.g. multirun/<date>/<time>, after at least one job has started training"
        )
    return sorted(run_dirs, key=lambda p: natural_key(str(p.relative_to(sweep_dir))))


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl; a cut-off last line (a run still writing, or killed) is skipped."""
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the writer was interrupted mid-line
                print(f"summarize_runs: {path}:{number}: skipping an incomplete last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}); each line must be one record") from err
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f'{path}:{number}: expected a JSON object with a "kind" field, got {line[:80]!r}')
        records.append(record)
    return records


def epoch_records(records: list[dict], path: Path) -> list[dict]:
    """The last "epoch" record for each epoch number (a resumed run may have logged an epoch twice)."""
    by_epoch = {}
    for record in records:
        if record["kind"] != "epoch":
            continue
        if "epoch" not in record:
            raise ValueError(f'{path}: an "epoch" record without an "epoch" field: {record}')
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err


def read_overrides(run_dir: Path) -> dict[str, str]:
    """Hydra's task overrides of the run as {key: value} ('+' / '++' / '~' prefixes dropped from the key)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides = read_yaml(path) or []
    if not isinstance(overrides, list):
        raise ValueError(f"{path}: expected a list of 'key=value' strings, got {type(overrides).__name__}")
    parsed = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    config = read_yaml(path) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(config).__name__}")
    return config


def read_hardware(epochs: list[dict], path: Path) -> list[tuple[int, str]] | None:
    """(world_size, device) of each epoch record, as train.py logs them; None when a record lacks them (written
    by an older train.py), so that no GPU-hours are guessed."""
    hardware = []
    for record in epochs:
        if "world_size" not in record or "device" not in record:
            return None
        world_size, device = record["world_size"], record["device"]
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(
                f'{path}: the "epoch" record of epoch {record["epoch"]} has world_size={world_size!r}; '
                "expected the number of processes, an integer >= 1"
            )
        if not isinstance(device, str) or not device:
            raise ValueError(
                f'{path}: the "epoch" record of epoch {record["epoch"]} has device={device!r}; '
                "expected a torch device type such as 'cuda' or 'cpu'"
            )
        hardware.append((world_size, device))
    return hardware


def load_run(sweep_dir: Path, run_dir: Path) -> Run:
    metrics_path = run_dir / METRICS_FILE
    epochs = epoch_records(read_metrics(metrics_path), metrics_path)
    run = Run(
        name=str(run_dir.relative_to(sweep_dir)) or ".",
        path=run_dir,
        overrides=read_overrides(run_dir),
        config=read_config(run_dir),
        epochs=epochs,
        hardware=read_hardware(epochs, metrics_path),
    )
    if not run.epochs:
        run.notes.append("no epoch finished")
    elif run.hardware is None:
        run.notes.append("epoch records without world_size / device (an older train.py): no GPU-hours")
    elif run.epochs[-1].get("partial"):  # train.py validated part of an epoch (trainer.max_steps)
        run.notes.append(f"last epoch partial (stopped at global step {run.epochs[-1].get('global_step')})")
    return run


def nested_get(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def metric_values(run: Run, key: str) -> list[float]:
    return [float(record[key]) for record in run.epochs if record.get(key) is not None]


def hardware_label(world_size: int, device: str) -> str:
    return f"{world_size} GPU" if device == "cuda" else f"{device.upper()} ({world_size} proc)"


def resource_columns(run: Run) -> dict:
    """Wall time (sum of epoch times), and GPU-hours: the sum over epochs on CUDA of processes x epoch time."""
    times = metric_values(run, "epoch_time_s")
    wall_h = sum(times) / 3600 if times else None
    if wall_h is None or run.hardware is None:
        return {"hardware": MISSING, "wall_h": wall_h, "gpu_hours": None}
    gpu_seconds = sum(
        world_size * float(record["epoch_time_s"])
        for record, (world_size, device) in zip(run.epochs, run.hardware, strict=True)
        if device == "cuda" and record.get("epoch_time_s") is not None
    )
    labels = dict.fromkeys(hardware_label(*pair) for pair in run.hardware)  # in order of appearance, once each
    return {"hardware": ", ".join(labels), "wall_h": wall_h, "gpu_hours": gpu_seconds / 3600}


def run_row(run: Run, knobs: list[str]) -> dict:
    top1, top5 = metric_values(run, "val_top1"), metric_values(run, "val_top5")
    img_per_s = metric_values(run, "img_per_s")
    planned = nested_get(run.config, "schedule.epochs")
    row = {"run": run.name}
    row.update({knob: run.overrides.get(knob, MISSING) for knob in knobs})
    row.update(
        {
            "epochs": f"{len(run.epochs)}/{planned}" if planned is not None else str(len(run.epochs)),
            "best_top1": max(top1) if top1 else None,
            "best_epoch": int(run.epochs[top1.index(max(top1))]["epoch"]) + 1 if top1 else None,
            "final_top1": top1[-1] if top1 else None,
            "best_top5": max(top5) if top5 else None,
            "final_top5": top5[-1] if top5 else None,
            "img_per_s": statistics.median(img_per_s) if img_per_s else None,
        }
    )
    row.update(resource_columns(run))
    row["notes"] = "; ".join(run.notes)
    return row


def knob_keys(runs: list[Run], varying_only: bool) -> list[str]:
    keys = sorted({key for run in runs for key in run.overrides})
    if not varying_only:
        return keys
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def format_cell(value, column: str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column in ("wall_h", "gpu_hours"):
            return f"{value:.3f}" if value >= 0.01 else f"{value:.2g}"
        return f"{value:.1f}" if column == "img_per_s" else f"{value:.2f}"
    return str(value)


def to_markdown(rows: list[dict], columns: list[str], common: dict[str, str]) -> str:
    lines = []
    if common:
        lines.append("Overrides common to all runs: " + ", ".join(f"`{k}={v}`" for k, v in sorted(common.items())))
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [format_cell(row[column], column).replace("|", "\\|") for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if row[column] is None else row[column] for column in columns})


def run_label(run: Run, knobs: list[str]) -> str:
    settings = ", ".join(f"{knob}={run.overrides[knob]}" for knob in knobs if knob in run.overrides)
    return f"{run.name}: {settings}" if settings else run.name


def plot_runs(runs: list[Run], knobs: list[str]) -> Figure:
    """Left: validation top-1 per epoch, one line per run, labelled with the knobs that differ between runs.
    Right: train (solid) and val (dashed) loss per epoch."""
    fig, (ax_top1, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for index, run in enumerate(runs):
        color = colors(index % colors.N)
        x = [int(record["epoch"]) + 1 for record in run.epochs]
        ax_top1.plot(
            x,
            [record.get("val_top1", math.nan) for record in run.epochs],
            "o-",
            color=color,
            label=run_label(run, knobs),
        )
        ax_loss.plot(x, [record.get("train_loss", math.nan) for record in run.epochs], "-", color=color)
        ax_loss.plot(x, [record.get("val_loss", math.nan) for record in run.epochs], "--", color=color)
    ax_top1.set(xlabel="epoch", ylabel="val top-1 (%)", title="Validation top-1")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss (train solid, val dashed)")
    ax_top1.legend(fontsize="small", loc="best")
    ax_loss.legend(
        handles=[
            Line2D([], [], color="black", linestyle="-", label="train"),
            Line2D([], [], color="black", linestyle="--", label="val"),
        ],
        fontsize="small",
    )
    for ax in (ax_top1, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def summarize(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Summary:
    sweep_dir = Path(sweep_dir)
    runs = [load_run(sweep_dir, run_dir) for run_dir in find_run_dirs(sweep_dir)]
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    all_knobs = knob_keys(runs, varying_only=False)
    varying = knob_keys(runs, varying_only=True)
    common = {k: runs[0].overrides[k] for k in all_knobs if k not in varying and k in runs[0].overrides}
    metrics = [
        "epochs",
        "best_top1",
        "best_epoch",
        "final_top1",
        "best_top5",
        "final_top5",
        "img_per_s",
        "hardware",
        "wall_h",
        "gpu_hours",
        "notes",
    ]
    rows = [run_row(run, all_knobs) for run in runs]

    markdown = to_markdown(rows, ["run", *varying, *metrics], common)
    markdown_path, csv_path, png_path = (out_dir / f"summary.{ext}" for ext in ("md", "csv", "png"))
    markdown_path.write_text(markdown)
    write_csv(csv_path, rows, ["run", *all_knobs, *metrics])
    figure = plot_runs(runs, varying)
    figure.savefig(png_path, dpi=120)
    return Summary(runs, ["run", *varying, *metrics], rows, markdown, markdown_path, csv_path, png_path, figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="directory of a sweep (python train.py -m ...), or any tree of run dirs")
    parser.add_argument("--out-dir", help="where summary.md / .csv / .png go (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir, args.out_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"summarize_runs: error: {err}", file=sys.stderr)
        return 2
    print(summary.markdown)
    print(f"wrote {summary.markdown_path}, {summary.csv_path}, {summary.png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
