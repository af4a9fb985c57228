#!/usr/bin/env python
"""Evaluate one checkpoint on every evaluation set found (`make eval-suite CHECKPOINT=<name or path> ROOTS=<dir>`).

    python scripts/eval_suite.py --checkpoint res2net50_26w_4s --roots /data/eval [--model NAME] [--out-dir DIR]
        [--tolerance POINTS] [--published FILE] [OVERRIDE ...]

--checkpoint is a released model's name (its file is downloaded and verified into the cache) or the path of a
released file or of a train.py checkpoint (which brings its own architecture; --model names the variant of a bare
state_dict). --roots holds the sets as their archives unpack; a set that is absent is skipped with a line saying so:

    imagenet/val/<wnid>/ILSVRC2012_val_*.JPEG    ImageNet val (scripts/prepare_imagenet.py): row imagenet, and with
    real.json                                    ReaL's labels (google-research/reassessed-imagenet) row real
    imagenetv2-<variant>-format-val/<0..999>/*   ImageNetV2, each variant present: row imagenet_v2-<variant>
    sketch/<wnid>/*                              ImageNet-Sketch: row imagenet_sketch
    imagenet-r/<wnid>/*                          ImageNet-R (200 classes): row imagenet_r
    imagenet-a/<wnid>/*                          ImageNet-A (200 classes): row imagenet_a

Each set is one evaluation by evaluate.py's code and config (configs/eval.yaml with data=<set>), written to
<out-dir>/<row>/results.json; OVERRIDEs (evaluate.py's, e.g. data.backend=dali tta=flip data.batch_size=128
device=cuda) apply to every set; the default backend is torchvision, the reference path. Under torchrun every set is
counted exactly once over all processes. Then <out-dir>/suite.csv (one row per set in timm's results-CSV columns,
with dataset first and ece last) and <out-dir>/suite.md (our top-1 beside the published one where known: ImageNet val
for the released files, and timm's numbers for the other sets). Exit status 1 when a released checkpoint misses a
published top-1 by more than its tolerance (--tolerance, default the variant's own: res2net.models.variants, 0.1
points for most), 2 on a usage or data error.

--published FILE replaces the built-in table of other sets' numbers with a JSON object
{"<model name>": {"<row>": <top-1>, ...}} (private model zoos, tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from res2net.data.testsets import EVAL_SETS
from res2net.report import fmt, markdown_table, tolerance_for, write_csv

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("eval_suite")

# Published top-1 (timm's results CSVs: 224 px, crop 0.875, bilinear) on the sets other than ImageNet val, whose
# numbers for the released files come with them (res2net.models.variants). res2net50d's weights are on the Hugging
# Face hub only; resnet50.a1_in1k (RSB A1, 80.38 / 85.71 / 68.47 / 29.64 / 40.42 / 9.97) is not a Res2Net.
PUBLISHED: dict[str, dict[str, float]] = {
    "res2net50d": {
        "imagenet": 80.28,
        "real": 85.76,
        "imagenet_v2-matched-frequency": 68.39,
        "imagenet_sketch": 25.50,
        "imagenet_r": 37.22,
        "imagenet_a": 14.61,
    },
}
CSV_COLUMNS = (
    "dataset",
    "model",
    "img_size",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "crop_pct",
    "interpolation",
    "ece",
)
IMAGENET_DIR, REAL_FILE = "imagenet", "real.json"


@dataclass(frozen=True)
class SuiteRun:
    row: str  # row name; also the output sub-directory
    overrides: tuple[str, ...]  # evaluate.py overrides selecting the set
    real: bool = False  # also gives the 'real' row


def find_runs(roots: Path) -> tuple[list[SuiteRun], list[str]]:
    """(the evaluations of the sets present under roots, one line per set that is absent)."""
    runs, skipped = [], []
    val = roots / IMAGENET_DIR / "val"
    if val.is_dir():
        real = roots / REAL_FILE
        extra = (f"real_labels={real}",) if real.is_file() else ()
        runs.append(
            SuiteRun(
                "imagenet",
                ("data=imagenet", f"data.root={roots / IMAGENET_DIR}", "data.backend=torchvision", *extra),
                bool(extra),
            )
        )
        if not extra:
            skipped.append(f"skipping real: {real} not found (ReaL labels of ImageNet val)")
    else:
        skipped.append(f"skipping imagenet and real: {val} not found (ImageNet val, scripts/prepare_imagenet.py)")
    for name, s in EVAL_SETS.items():
        for variant, folder in s.folders.items():
            row = f"{name}-{variant}" if variant else name
            if (roots / folder).is_dir():
                select = (f"testset_variant={variant}",) if variant else ()
                runs.append(SuiteRun(row, (f"data={name}", f"data.root={roots}", *select)))
            else:
                skipped.append(f"skipping {row}: {roots / folder} not found (download: {s.source})")
    return runs, skipped


def released_file_model(checkpoint: str) -> str | None:
    """The model whose released file ``checkpoint`` is named after, if any."""
    from res2net.models.variants import RELEASED

    return next((name for name, e in RELEASED.items() if e.file == Path(checkpoint).name), None)


def checkpoint_overrides(checkpoint: str, model: str | None) -> tuple[list[str], bool]:
    """(evaluate.py overrides naming the model and checkpoint, whether it is a released checkpoint)."""
    import res2net

    if checkpoint in res2net.list_models():
        return [f"model={checkpoint}", "checkpoint=released"], True
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint!r} is neither a model name ({', '.join(res2net.list_models())}) nor a file"
        )
    released = released_file_model(checkpoint)
    model = model or released
    return [f"checkpoint={Path(checkpoint).resolve()}", *([f"model={model}"] if model else [])], released is not None


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from res2net.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def rows_of(run: SuiteRun, out: dict) -> list[dict]:
    """Table rows of one results.json: the set's, and ReaL's for the val run with real labels."""
    data = out["config"]["data"]
    common = {
        "model": out["model"],
        "img_size": data["img_size"],
        "crop_pct": data["crop_pct"],
        "interpolation": data["interpolation"],
        "param_count": out["param_count"],
    }
    rows = [
        {
            "dataset": run.row,
            **common,
            "top1": out["top1"],
            "top5": out["top5"],
            "ece": out["ece"],
            "count": out["count"],
        }
    ]
    if run.real and out.get("real_count"):
        rows.append(
            {
                "dataset": "real",
                **common,
                "top1": out["real_top1"],
                "top5": out["real_top5"],
                "ece": None,
                "count": out["real_count"],
            }
        )
    return rows


def judge(
    rows: list[dict], val_published: float | None, table: dict[str, float], tolerance: float, released: bool
) -> None:
    """Adds published_top1, delta_top1, tolerance and status (ok | FAIL | unchecked | -) to each row."""
    for r in rows:
        r["tolerance"] = tolerance
        published = (
            val_published if r["dataset"] == "imagenet" and val_published is not None else table.get(r["dataset"])
        )
        r["published_top1"] = published
        r["delta_top1"] = None if published is None else r["top1"] - published
        if published is None:
            r["status"] = "-"
        elif not released:
            r["status"] = "unchecked"  # not a released checkpoint: the published number is for reference
        else:
            r["status"] = "FAIL" if abs(r["delta_top1"]) > tolerance + 1e-9 else "ok"


def markdown_rows(rows: list[dict]) -> str:
    head = ["set", "images", "top-1", "top-5", "ECE", "published top-1", "delta", "tolerance", "status"]
    cells = [
        [
            r["dataset"],
            fmt(r["count"]),
            fmt(r["top1"]),
            fmt(r["top5"]),
            fmt(r["ece"], 4),
            fmt(r["published_top1"], 2),
            fmt(r["delta_top1"], 2, signed=True),
            fmt(r["tolerance"], 2),
            r["status"],
        ]
        for r in rows
    ]
    return markdown_table(head, cells)


def csv_row(r: dict) -> dict:
    """timm's results-CSV conventions: percentages with 3 decimals, errors as 100 - accuracy, parameters in M."""
    return {
        "dataset": r["dataset"],
        "model": r["model"],
        "img_size": r["img_size"],
        "top1": f"{r['top1']:.3f}",
        "top1_err": f"{100 - r['top1']:.3f}",
        "top5": f"{r['top5']:.3f}",
        "top5_err": f"{100 - r['top5']:.3f}",
        "param_count": f"{r['param_count'] / 1e6:.2f}",
        "crop_pct": r["crop_pct"],
        "interpolation": r["interpolation"],
        "ece": "" if r["ece"] is None else f"{r['ece']:.4f}",
    }


def write_tables(rows: list[dict], out_dir: Path, caption: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "suite.md", out_dir / "suite.csv"
    md.write_text(f"{caption}\n\n{markdown_rows(rows)}\n")
    write_csv(csv_path, CSV_COLUMNS, [csv_row(r) for r in rows])
    return md, csv_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a released model's name, or a checkpoint file")
    p.add_argument("--roots", required=True, type=Path, help="the folder holding the sets (layout above)")
    p.add_argument("--model", default=None, help="the variant of a bare state_dict (default: from the checkpoint)")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/eval_suite"))
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="allowed |delta| of a released checkpoint's top-1, in points (default: the variant's own)",
    )
    p.add_argument("--published", default=None, help="JSON table replacing the built-in one (see above)")
    p.add_argument("overrides", nargs="*", help="evaluate.py overrides applied to every set, e.g. data.backend=dali")
    return p.parse_args(argv)


def run(args: argparse.Namespace, dist_info) -> tuple[list[dict], bool] | None:
    """Evaluate every set found; on rank 0 returns (table rows, whether a released checkpoint failed)."""
    from res2net.data.preprocess import command_line_fields
    from res2net.engine.eval_job import evaluate_checkpoint

    if not args.roots.is_dir():
        raise FileNotFoundError(f"--roots {args.roots} is not a directory")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value (evaluate.py's, configs/eval.yaml): {bad}")
    model_overrides, released = checkpoint_overrides(args.checkpoint, args.model)
    runs, skipped = find_runs(args.roots)
    for line in skipped if dist_info.is_main else ():
        print(line)
    if not runs:
        raise FileNotFoundError(
            f"no evaluation set under {args.roots}; expected the layout of scripts/eval_suite.py --help"
        )
    table = json.loads(Path(args.published).read_text()) if args.published else PUBLISHED
    rows = []
    for r in runs:
        cfg = compose_config([*model_overrides, *r.overrides, *args.overrides])
        if dist_info.is_main:
            print(f"evaluating {r.row}: {' '.join(r.overrides)}", flush=True)
        # The checkpoint's own preprocessing, except data.* fields given as overrides.
        keep = command_line_fields(args.overrides)
        out = evaluate_checkpoint(cfg, args.out_dir / r.row if dist_info.is_main else None, dist_info, keep_data=keep)
        if out is not None:
            found = rows_of(r, out)
            val_published = out["published"]["top1"] if out["published"] else None
            tolerance = tolerance_for(out["model"], args.tolerance)
            judge(found, val_published, table.get(out["model"], {}), tolerance, released)
            rows += found
    return (rows, any(r["status"] == "FAIL" for r in rows)) if dist_info.is_main else None


def main(argv: list[str] | None = None) -> int:
    from res2net.engine import distributed

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with distributed.process_group() as dist_info:
        try:
            outcome = run(args, dist_info)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            print(f"eval_suite.py: error: {err}", file=sys.stderr)
            return 2
    if outcome is None:
        return 0
    rows, failed = outcome
    caption = f"{args.checkpoint}; evaluate.py overrides: {' '.join(args.overrides) or 'none'}"
    md, csv_path = write_tables(rows, args.out_dir, caption)
    print(md.read_text(), end="")
    print(f"tables: {md}, {csv_path}")
    if failed:
        bad = ", ".join(
            f"{r['dataset']} ({r['delta_top1']:+.2f}, tolerance {r['tolerance']})"
            for r in rows
            if r["status"] == "FAIL"
        )
        print(
            f"FAIL: {args.checkpoint} misses its published top-1 by more than the tolerance on: {bad}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
