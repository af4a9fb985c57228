#!/usr/bin/env python
"""`make demo`: the whole recipe on a small real data set, on the CPU, in minutes.

1. writes scikit-learn's handwritten digits as an ImageFolder of 32 px JPEGs under data/demo/ (once);
2. trains a reduced Res2Net with the real train.py: `python train.py experiment=demo` (configs/experiment/demo.yaml);
3. evaluates the best checkpoint with the real evaluate.py, which takes the run's own validation preprocessing
from the checkpoint, and prints top-1/top-5 and where the run directory is. Exits 1 if top-1 is below --min-top1.

--finetune (`make demo-finetune`): the fine-tuning workflow instead. Trains on the digits 0-4, fine-tunes that
checkpoint on the digits 5-9 with a new head (`experiment=[demo,finetune] model.init_checkpoint=...`), trains the
same reduced model on 5-9 from scratch for as many epochs, prints both accuracies side by side and predicts a few
images with their class names (scripts/predict.py).

    python scripts/demo.py                                   # what `make demo` runs
    python scripts/demo.py --per-class 60 schedule.epochs=4  # a shorter run; extra arguments go to train.py
    python scripts/demo.py --finetune                        # what `make demo-finetune` runs
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

# Data settings evaluate.py takes over from the training run's config.yaml; the preprocessing (image size, crop,
# interpolation, mean, std) it takes from the checkpoint itself.
_EVAL_DATA_KEYS = ("root", "backend", "batch_size", "num_workers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "demo"), help="where the digits are written")
    p.add_argument("--run-dir", default=None, help="run directory (default: outputs/demo/<date>_<time>)")
    p.add_argument("--per-class", type=int, default=None, help="use only the first N images of each digit")
    p.add_argument(
        "--min-top1", type=float, default=None, help="exit 1 below this val top-1 (%%; default 90, --finetune 50)"
    )
    p.add_argument("--finetune", action="store_true", help="the fine-tuning demo (make demo-finetune)")
    p.add_argument("--source-epochs", type=int, default=15, help="--finetune: epochs on the digits 0-4")
    p.add_argument("--epochs", type=int, default=3, help="--finetune: epochs of the fine-tuned and scratch runs")
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


def _half(data: Path, digits: str, target: Path) -> Path:
    """An ImageFolder of some digits: links to their class folders in the demo data set (train/ and val/)."""
    for split in ("train", "val"):
        (target / split).mkdir(parents=True, exist_ok=True)
        for d in digits:
            link = target / split / d
            if not link.exists():
                link.symlink_to((data / split / d).resolve(), target_is_directory=True)
    return target


def _val_top1(run_dir: Path) -> list[float]:
    """Val top-1 after each epoch of a run, from its metrics.jsonl."""
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    return [e["val_top1"] for e in epochs if e["kind"] == "epoch"]


def finetune_demo(args: argparse.Namespace, data: Path, run_dir: Path) -> int:
    """Digits 0-4 -> fine-tune on 5-9 with a new head, beside 5-9 from scratch; predict a few images."""
    first, second = _half(data, "01234", run_dir / "digits_0-4"), _half(data, "56789", run_dir / "digits_5-9")
    source, tuned, scratch = run_dir / "source_0-4", run_dir / "finetuned_5-9", run_dir / "scratch_5-9"
    common = [sys.executable, "train.py", "trainer.log_interval=100", *args.overrides]
    start = time.perf_counter()
    _run([*common, "experiment=demo", f"data.root={first}", f"schedule.epochs={args.source_epochs}",
          f"hydra.run.dir={source}"])  # fmt: skip
    source_seconds, start = time.perf_counter() - start, time.perf_counter()
    _run([*common, "experiment=[demo,finetune]", f"data.root={second}", f"schedule.epochs={args.epochs}",
          f"model.init_checkpoint={source / 'checkpoints' / 'best.pth'}", f"hydra.run.dir={tuned}"])  # fmt: skip
    tuned_seconds, start = time.perf_counter() - start, time.perf_counter()
    _run([*common, "experiment=demo", f"data.root={second}", f"schedule.epochs={args.epochs}",
          "schedule.warmup_epochs=1", f"hydra.run.dir={scratch}"])  # fmt: skip
    scratch_seconds = time.perf_counter() - start
    samples = sorted((second / "val").glob("*/*.jpg"))[::40][:6]
    _run([sys.executable, "scripts/predict.py", str(tuned / "checkpoints" / "best.pth"), *map(str, samples),
          "--topk", "2", "--csv", str(tuned / "predictions.csv")])  # fmt: skip
    rows = [
        ("source: digits 0-4, from scratch", _val_top1(source), source_seconds),
        ("digits 5-9, fine-tuned from it", _val_top1(tuned), tuned_seconds),
        ("digits 5-9, from scratch", _val_top1(scratch), scratch_seconds),
    ]
    print("\nfine-tuning demo (digits; val top-1 %, best and after each epoch; wall time of the train.py run):")
    for what, tops, seconds in rows:
        curve = " ".join(f"{t:.1f}" for t in tops)
        print(f"  {what:34s} best {max(tops):6.2f}  {len(tops):2d} epochs {seconds:4.0f} s  [{curve}]")
    print(f"runs: {run_dir}")
    minimum = 50.0 if args.min_top1 is None else args.min_top1  # chance: 20%
    if max(rows[1][1]) < minimum:
        print(f"demo: fine-tuned top-1 {max(rows[1][1]):.2f}% is below {minimum}%", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    data = make_demo_dataset(args.data, per_class=args.per_class)
    counts = json.loads((data / MANIFEST).read_text())["counts"]
    print(f"demo data: {data} ({counts['train']} train / {counts['val']} val images, 10 classes)", flush=True)
    run_dir = Path(args.run_dir or ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if args.finetune:
        return finetune_demo(args, data, run_dir)
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
    minimum = 90.0 if args.min_top1 is None else args.min_top1
    if results["top1"] < minimum:
        print(f"demo: top-1 {results['top1']:.2f}% is below {minimum}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
