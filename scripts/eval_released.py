#!/usr/bin/env python
"""Evaluate every released checkpoint against its published top-1/top-5 (`make eval DATA=<imagenet root>`).

    python scripts/eval_released.py --data /data/imagenet [--backend torchvision|dali] [--models res2net50_26w_4s ...]

Missing checkpoints are downloaded into the cache and verified (res2net.models.download; RES2NET_MIRRORS and
RES2NET_CACHE apply). Each model is evaluated at 224 px with a 0.875 crop (the published protocol) by the same code
as evaluate.py, and a table is printed and written as Markdown and CSV to --out-dir: model, params, GMACs, published
and measured top-1/top-5, delta, img/s. The exit status is 1 when a |delta| (top-1 or top-5) exceeds the model's
tolerance (res2net.models.variants, or --tolerance for every model).

--backend torchvision is the reference path (PIL decoding, how the published numbers were measured). With
--backend dali the table also gives DALI's top-1 delta to the reference path, from the reference results already in
--out-dir for the same checkpoint and data, or measured now.

--int8 (`make eval` passes it) adds int8 columns: each checkpoint exported to ONNX, quantised to int8 by ONNX
Runtime (res2net.export.quantize_int8: static, QDQ, per-channel weights) with calibration on --calibration-images
images of --int8-calibration (default <data>/train) at the same 224 px / crop preprocessing, and evaluated by the same
code with runtime=onnxruntime on the CPU: int8 top-1 / top-5 and its top-1 minus the float top-1 measured above. The
files and results go to --out-dir/<model>/int8/.

--published FILE replaces the built-in list of released checkpoints with a JSON object (for private model zoos and
tests): {"<model name>": {"file": "<name>-<sha256 prefix>.pth", "top1": 77.99, "top5": 93.86,
"tolerance": 0.1, "overrides": {"num_classes": 10, "base_width": 4, ...}}}; top1/top5 may be null; "overrides" takes
the model config keys (res2net.models.CONFIG_KEYS).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from res2net import export, report
from res2net.data.config import DataConfig
from res2net.engine.distributed import barrier, init_distributed
from res2net.engine.eval_job import RESULTS_FILE, evaluate_checkpoint
from res2net.errors import run_script
from res2net.models import RELEASED, download_checkpoint, model_from_config
from res2net.models.loading import load_checkpoint_model
from res2net.models.stats import count_macs, count_params
from res2net.models.variants import DEFAULT_TOLERANCE

log = logging.getLogger("eval_released")

REFERENCE_BACKEND = "torchvision"
COLUMNS = (
    "model",
    "params_m",
    "gmacs",
    "published_top1",
    "published_top5",
    "top1",
    "top5",
    "delta_top1",
    "delta_top5",
    "img_per_s",
    "tolerance",
    "status",
)
DALI_COLUMN = "dali_minus_torchvision_top1"
INT8_COLUMNS = ("int8_top1", "int8_top5", "int8_minus_fp32_top1")


@dataclass(frozen=True)
class Entry:
    name: str
    file: str
    top1: float | None
    top5: float | None
    tolerance: float = DEFAULT_TOLERANCE
    overrides: dict = field(default_factory=dict)


def released_entries(tolerance: float | None = None) -> dict[str, Entry]:
    return {
        name: Entry(name, v.file, v.top1, v.top5, report.tolerance_for(name, tolerance)) for name, v in RELEASED.items()
    }


def entries_from_json(path: str | Path, tolerance: float | None = None) -> dict[str, Entry]:
    table = json.loads(Path(path).read_text())
    allowed = {"file", "top1", "top5", "tolerance", "overrides"}
    entries = {}
    for name, spec in table.items():
        unknown = sorted(set(spec) - allowed)
        if unknown or "file" not in spec:
            raise ValueError(f"{path}: entry {name!r} needs 'file' and may have {sorted(allowed)}; got {sorted(spec)}")
        entries[name] = Entry(
            name,
            spec["file"],
            spec.get("top1"),
            spec.get("top5"),
            spec.get("tolerance", report.tolerance_for(name, tolerance)),
            dict(spec.get("overrides", {})),
        )
    return entries


def select(entries: dict[str, Entry], names: list[str] | None) -> list[Entry]:
    unknown = [n for n in names or [] if n not in entries]
    if unknown:
        raise ValueError(f"no released checkpoint for {unknown}; choose from: {', '.join(sorted(entries))}")
    return [entries[n] for n in (names or sorted(entries))]


def model_config(entry: Entry) -> dict:
    """The model config of an entry: its variant (1000 classes) with the entry's overrides."""
    return {"name": entry.name, "num_classes": 1000, **entry.overrides}


def model_stats(entry: Entry, img_size: int) -> tuple[float, float]:
    """(parameters in millions, GMACs at img_size), counted on a weightless (meta) copy."""
    with torch.device("meta"):
        model = model_from_config(model_config(entry))
    return count_params(model) / 1e6, count_macs(model, img_size) / 1e9


def eval_config(entry: Entry, checkpoint: Path, args: argparse.Namespace, backend: str) -> dict:
    model = model_config(entry)
    data = {
        "root": args.data,
        "backend": backend,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "img_size": args.img_size,
        "crop_pct": args.crop_pct,
        "interpolation": "bilinear",
    }
    return {
        "model": model,
        "data": data,
        "checkpoint": str(checkpoint),
        "trust_checkpoint": False,  # released files hold tensors only
        "use_ema": False,
        "amp": args.amp,
        "channels_last": True,
        "compile": False,
        "fold_bn": True,
        "device": args.device,
        "save_predictions": False,
        "progress": not args.no_progress,
    }


def _same_evaluation(saved: dict, cfg: dict, sha256: str) -> bool:
    keys = ("root", "img_size", "crop_pct", "interpolation")
    return (
        saved.get("checkpoint_sha256") == sha256
        and saved["config"]["model"]["name"] == cfg["model"]["name"]
        and all(saved["config"]["data"].get(k) == cfg["data"][k] for k in keys)
    )


def evaluate_backend(entry: Entry, checkpoint: Path, args: argparse.Namespace, backend: str, dist_info) -> dict:
    cfg = eval_config(entry, checkpoint, args, backend)
    return evaluate_checkpoint(cfg, Path(args.out_dir) / entry.name / backend, dist_info)


def reference_top1(entry: Entry, checkpoint: Path, measured: dict, args: argparse.Namespace, dist_info) -> float:
    """Top-1 of the reference (torchvision) path for the same checkpoint and data: saved, or measured now."""
    saved_path = Path(args.out_dir) / entry.name / REFERENCE_BACKEND / RESULTS_FILE
    cfg = eval_config(entry, checkpoint, args, REFERENCE_BACKEND)
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        if _same_evaluation(saved, cfg, measured["checkpoint_sha256"]):
            log.info("%s: reference (torchvision) result reused from %s", entry.name, saved_path)
            return saved["top1"]
    log.info("%s: measuring the reference (torchvision) path for the DALI delta", entry.name)
    return evaluate_backend(entry, checkpoint, args, REFERENCE_BACKEND, dist_info)["top1"]


def int8_result(entry: Entry, checkpoint: Path, args: argparse.Namespace, dist_info) -> dict:
    """evaluate.py runtime=onnxruntime's result for the int8 export of ``checkpoint``: rank 0 exports and quantises it
    (calibrated on args.int8_calibration at the evaluation's preprocessing) into out_dir/<model>/int8/, then every
    rank evaluates it."""
    folder = Path(args.out_dir) / entry.name / "int8"
    int8_file = folder / f"{entry.name}.int8.onnx"
    cfg = eval_config(entry, int8_file, args, args.backend)
    if dist_info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        calibration = args.int8_calibration or Path(args.data) / "train"
        files = export.calibration_files(calibration, args.calibration_images)
        model, _, _, _ = load_checkpoint_model(checkpoint, cfg["model"])
        float_file = export.export_onnx(model.eval(), folder / f"{entry.name}.onnx", img_size=args.img_size)
        preprocessing = {k: cfg["data"][k] for k in ("img_size", "crop_pct", "interpolation")}
        log.info("%s: quantising to int8, calibrated on %d images of %s", entry.name, len(files), calibration)
        export.quantize_int8(float_file, int8_file, files, DataConfig(backend="torchvision", **preprocessing))
    barrier()
    cfg.update(runtime="onnxruntime", device="cpu", amp="off", channels_last=False)
    return evaluate_checkpoint(cfg, folder, dist_info)


def int8_columns(result: dict, fp32_top1: float) -> dict:
    return dict(int8_top1=result["top1"], int8_top5=result["top5"], int8_minus_fp32_top1=result["top1"] - fp32_top1)


def _delta(measured: float, published: float | None) -> float | None:
    return None if published is None else measured - published


def table_row(entry: Entry, result: dict, stats: tuple[float, float]) -> dict:
    d1, d5 = _delta(result["top1"], entry.top1), _delta(result["top5"], entry.top5)
    failed = any(d is not None and abs(d) > entry.tolerance + 1e-9 for d in (d1, d5))
    unpublished = entry.top1 is None and entry.top5 is None
    return {
        "model": entry.name,
        "params_m": stats[0],
        "gmacs": stats[1],
        "published_top1": entry.top1,
        "published_top5": entry.top5,
        "top1": result["top1"],
        "top5": result["top5"],
        "delta_top1": d1,
        "delta_top5": d5,
        "img_per_s": result["img_per_s"],
        "tolerance": entry.tolerance,
        "status": "FAIL" if failed else ("unpublished" if unpublished else "ok"),
    }


def markdown_table(rows: list[dict]) -> str:
    dali = any(DALI_COLUMN in r for r in rows)
    int8 = any(INT8_COLUMNS[0] in r for r in rows)
    head = [
        "model",
        "params (M)",
        "GMACs",
        "published top-1",
        "published top-5",
        "top-1",
        "top-5",
        "delta top-1",
        "delta top-5",
        "img/s",
        "tolerance",
        "status",
    ] + (["DALI - torchvision top-1"] if dali else [])
    head += ["int8 top-1", "int8 top-5", "int8 - fp32 top-1"] if int8 else []
    table = []
    for r in rows:
        cells = [
            r["model"],
            report.fmt(r["params_m"], 2),
            report.fmt(r["gmacs"], 2),
            report.fmt(r["published_top1"]),
            report.fmt(r["published_top5"]),
            report.fmt(r["top1"]),
            report.fmt(r["top5"]),
            report.fmt(r["delta_top1"], signed=True),
            report.fmt(r["delta_top5"], signed=True),
            report.fmt(r["img_per_s"], 1),
            report.fmt(r["tolerance"], 2),
            r["status"],
        ]
        if dali:
            cells.append(report.fmt(r.get(DALI_COLUMN), signed=True))
        if int8:
            cells += [report.fmt(r.get("int8_top1")), report.fmt(r.get("int8_top5"))]
            cells.append(report.fmt(r.get("int8_minus_fp32_top1"), signed=True))
        table.append(cells)
    return report.markdown_table(head, table)


def write_tables(rows: list[dict], out_dir: Path, backend: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / f"released_{backend}.md", out_dir / f"released_{backend}.csv"
    md.write_text(markdown_table(rows) + "\n")
    columns = list(COLUMNS) + ([DALI_COLUMN] if any(DALI_COLUMN in r for r in rows) else [])
    columns += list(INT8_COLUMNS) if any(INT8_COLUMNS[0] in r for r in rows) else []
    report.write_csv(csv_path, columns, rows)
    return md, csv_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="data root holding val/<wnid>/*.JPEG")
    p.add_argument("--backend", choices=("torchvision", "dali"), default=REFERENCE_BACKEND)
    p.add_argument("--models", nargs="+", default=None, help="subset to evaluate (default: all released)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers / DALI threads")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="allowed |delta| in points for every model (default: each model's own in "
        f"res2net.models.variants, {DEFAULT_TOLERANCE} unless stated there)",
    )
    p.add_argument("--published", default=None, help="JSON table replacing the released list (see above)")
    p.add_argument("--int8", action="store_true", help="add the int8 columns (see above)")
    p.add_argument(
        "--int8-calibration", type=Path, default=None, help="folder of calibration images (default: <data>/train)"
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=export.CALIBRATION_IMAGES,
        help="int8 calibration images, spread evenly over the folder (default: %(default)s)",
    )
    p.add_argument("--out-dir", default="outputs/eval_released")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[list[dict], bool]:
    entries = entries_from_json(args.published, args.tolerance) if args.published else released_entries(args.tolerance)
    selected = select(entries, args.models)
    dist_info = init_distributed()
    rows = []
    for entry in selected:
        checkpoint = download_checkpoint(entry.file, progress=not args.no_progress)
        log.info("%s: evaluating %s with %s", entry.name, checkpoint, args.backend)
        result = evaluate_backend(entry, checkpoint, args, args.backend, dist_info)
        row = table_row(entry, result, model_stats(entry, args.img_size))
        if args.backend == "dali":
            row[DALI_COLUMN] = result["top1"] - reference_top1(entry, checkpoint, result, args, dist_info)
        if args.int8:
            row.update(int8_columns(int8_result(entry, checkpoint, args, dist_info), result["top1"]))
        log.info("%s: top-1 %.3f top-5 %.3f (%s)", entry.name, row["top1"], row["top5"], row["status"])
        rows.append(row)
    return rows, any(r["status"] == "FAIL" for r in rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        rows, failed = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"eval_released.py: error: {err}", file=sys.stderr)
        return 2
    md, csv_path = write_tables(rows, Path(args.out_dir), args.backend)
    print(markdown_table(rows))
    print(f"tables: {md}, {csv_path}")
    if failed:
        bad = ", ".join(f"{r['model']} (tolerance {r['tolerance']})" for r in rows if r["status"] == "FAIL")
        print(
            f"FAIL: measured accuracy differs from the published numbers by more than the tolerance: {bad}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
