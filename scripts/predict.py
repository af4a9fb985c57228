#!/usr/bin/env python
"""Classify images: the top-k class names and probabilities per image, printed and optionally written as CSV / JSON.

    python scripts/predict.py outputs/<run>/checkpoints/best.pth photo.jpg photos/ "more/*.png"
    python scripts/predict.py res2net50_26w_4s cat.jpg --topk 3            # released ImageNet weights, class names
    python scripts/predict.py model.onnx photos/ --csv predictions.csv    # an export from scripts/export.py
    python scripts/predict.py best.pth photos/ --device cuda --batch-size 64 --json predictions.json
    python scripts/predict.py outputs/<run>/checkpoints/best.pth outputs/<run>/split.json  # its held-out images

The source (a train.py checkpoint, a variant name, a released .pth / .safetensors with --model, an exported HF
folder, an .onnx file) brings its model, class names and evaluation preprocessing (image size, crop, interpolation,
mean, std); --img-size / --crop-pct / --interpolation / --mean / --std replace them. The same images give the same
probabilities as `evaluate.py save_predictions=true` with that checkpoint. Python: res2net.Predictor / res2net.predict.
Exit status: 0 done; 1 a runtime error (a missing file, a checkpoint that does not load); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from res2net.data.config import INTERPOLATIONS
from res2net.errors import run_script


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"predict.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="train.py checkpoint | variant name | released .pth/.safetensors | HF folder | .onnx")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively), globs or a run's split.json")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (.onnx: cpu)")
    p.add_argument("--model", default=None, help="the variant of a file that does not name it (a released file)")
    p.add_argument("--csv", type=Path, default=None, help="write path, rank, index, name, probability rows here")
    p.add_argument("--json", type=Path, default=None, help="write one object per image here")
    p.add_argument("--use-ema", action="store_true", help="a train.py checkpoint's EMA weights")
    p.add_argument("--img-size", type=int, default=None, help="replaces the checkpoint's evaluation size")
    p.add_argument("--crop-pct", type=float, default=None, help="replaces the checkpoint's crop fraction")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None)
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--quiet", action="store_true", help="print nothing per image (with --csv / --json)")
    args = p.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        p.error(f"--topk and --batch-size must be >= 1, got {args.topk} and {args.batch_size}")
    return args


def write_csv(path: Path, predictions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rank", "index", "name", "probability"])
        for p in predictions:
            for rank, (i, name, prob) in enumerate(zip(p.indices, p.names, p.probs), start=1):
                writer.writerow([p.path, rank, i, name, f"{prob:.6f}"])


def main(argv: list[str] | None = None) -> int:
    from res2net.predictor import Predictor

    args = parse_args(argv)
    predictor = Predictor(
        args.source,
        device=args.device,
        model=args.model,
        use_ema=args.use_ema,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
    )
    pp = predictor.preprocessing
    print(
        f"{predictor.model_name} ({predictor.num_classes} classes) on {predictor.device}: {pp.img_size} px, "
        f"crop_pct {pp.crop_pct:g}, {pp.interpolation}",
        file=sys.stderr,
    )
    start, predictions = time.perf_counter(), []
    for p in predictor.predict(args.inputs, topk=args.topk, batch_size=args.batch_size):
        predictions.append(p)
        if not args.quiet:
            print(f"{p.path}: " + ", ".join(f"{n} {prob:.3f}" for n, prob in zip(p.names, p.probs)), flush=True)
    seconds = time.perf_counter() - start
    print(f"{len(predictions)} images in {seconds:.1f} s", file=sys.stderr)
    if args.csv:
        write_csv(args.csv, predictions)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([p.to_dict() for p in predictions], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
