#!/usr/bin/env python
"""`make demo`: the whole recipe on a small real data set, on the CPU, in minutes.

1. writes scikit-learn's handwritten digits as an ImageFolder of 32 px JPEGs under data/demo/ (once);
2. trains a reduced Res2Net with the real train.py: `python train.py experiment=demo` (configs/experiment/demo.yaml);
3. evaluates the best checkpoint with the real evaluate.py, using the run's own validation preprocessing,
and prints top-1/top-5 and where the run directory is. Exits 1 if top-1 is below --min-top1.

    python scripts/demo.py                                   # what `make demo` runs
    python scripts/demo.py --per-class 60 schedule.epochs=4  # a shorter run; extra arguments go to train.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from res2net.data.demo import MANIFEST, make_demo_dataset
from res2net.errors import run_script

ROOT = Path(__file__).resolve().parents[1]

# Validation preprocessing evaluate.py takes over from the training run's config.yaml.
_EVAL_DATA_KEYS = (
    "root",
    "backend",
    "batch_size",
    "num_workers",
    "img_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "demo"), help="where the digits are written")
    p.add_argument("--run-dir", default=None, help="run directory (default: outputs/demo/<date>_<time>)")
    p.add_argument("--per-class", type=int, default=None, help="use only the first N images of each digit")
    p.add_argument("--min-top1", type=float, default=90.0, help="exit 1 below this val top-1 (%%)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py, e.g. schedule.epochs=4")
    return p.parse_args(argv)


def _run(cmd: list[str]) -> None:
    # A passive OpenMP wait keeps torch's threads from spinning against anything else using the 2 cores.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {proc.returncode}")


def _override(key: str, value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else ("null" if value is None else str(value))
    return f"{key}={text}"


def eval_overrides(run_dir: Path) -> list[str]:
    """evaluate.py overrides that reuse the training run's model checkpoint and validation preprocessing."""
    data = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))["data"]
    return [
        f"checkpoint={run_dir / 'checkpoints' / 'best.pth'}",
        "data=folder",
        *[_override(f"data.{k}", data[k]) for k in _EVAL_DATA_KEYS],
        "progress=false",
        f"hydra.run.dir={run_dir / 'eval'}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    data = make_demo_dataset(args.data, per_class=args.per_class)
    counts = json.loads((data / MANIFEST).read_text())["counts"]
    print(f"demo data: {data} ({counts['train']} train / {counts['val']} val images, 10 classes)", flush=True)
    run_dir = Path(args.run_dir or ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    _run(
        [
            sys.executable,
            "train.py",
            "experiment=demo",
            f"data.root={data.resolve()}",
            f"hydra.run.dir={run_dir}",
            *args.overrides,
        ]
    )
    _run([sys.executable, "evaluate.py", *eval_overrides(run_dir)])
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    print(
        f"\ndemo finished in {int(minutes)} min {seconds:.0f} s: best checkpoint val top-1 {results['top1']:.2f}%, "
        f"top-5 {results['top5']:.2f}% ({results['count']} images)"
    )
    print(
        f"run directory: {run_dir}\n  evaluation: {run_dir / 'eval' / 'results.json'}\n"
        f"  TensorBoard: .venv/bin/tensorboard --logdir {run_dir}"
    )
    if results["top1"] < args.min_top1:
        print(f"demo: top-1 {results['top1']:.2f}% is below {args.min_top1}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
