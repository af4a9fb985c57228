#!/usr/bin/env python
"""Images/s of the data backends (train and val pipelines) on the same folder and cores, as a table.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \\
    python scripts/bench_data.py --root ROOT [--backends torchvision dali] [--splits train val] \\
        [--workers 2 4] [--batch-size 64] [--img-size 224] [--batches 30] [--warmup 5] [--device cpu|cuda] \\
        [--rounds 3] [--in-process] [--augment none rand-m9-mstd0.5-inc1 ta_wide original jitter erasing]

--workers takes several values to tune the worker / thread count: for torchvision it is the number of DataLoader
worker processes, for DALI the pipeline's CPU threads. Each row warms up first, then times --batches batches
(running over epoch ends when the split is small), normalized batches on the device included. Each run of a row is
a fresh Python process, so that one backend's leftovers (DALI's buffers and threads, forked DataLoader workers) do
not slow the next (--in-process: all in this one); --rounds rounds go over all rows in turn and each row reports
its median, so a slow spell of the machine hits every row. Run it on a quiet machine: other processes on the same
cores change the numbers (on a shared 2-core VM, single runs vary by +-15%).

--augment adds train rows per augmentation (AUGMENTS below: an auto_augment policy, colour jitter 0.4, random
erasing 0.25) and a column with its cost per image over the same backend's 'none' row, in ms of one worker / thread.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from res2net.data import DataConfig, build_loader
from res2net.errors import run_script

# --augment names -> DataConfig fields of the row
AUGMENTS = {
    "none": {},
    "rand-m9-mstd0.5-inc1": {"auto_augment": "rand-m9-mstd0.5-inc1"},
    "rand-m6-mstd0.5": {"auto_augment": "rand-m6-mstd0.5"},
    "ta_wide": {"auto_augment": "ta_wide"},
    "original": {"auto_augment": "original"},
    "jitter": {"color_jitter": 0.4},
    "erasing": {"random_erasing": 0.25},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root with train/ and val/ class folders")
    p.add_argument(
        "--backends", nargs="+", default=["torchvision", "dali"], choices=["torchvision", "dali", "synthetic"]
    )
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--workers", nargs="+", type=int, default=[os.cpu_count() or 1])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the consuming process")
    p.add_argument("--rounds", type=int, default=1, help="runs per row (each in its own process); median reported")
    p.add_argument("--augment", nargs="+", default=["none"], choices=list(AUGMENTS), help="train augmentations")
    p.add_argument(
        "--dali-resize",
        default=None,
        choices=["torch", "graph"],
        help="data.dali_resize of the DALI rows (default: the loader's choice for the device; 'graph' is the GPU path)",
    )
    p.add_argument("--in-process", action="store_true", help="measure every row in this process (no isolation)")
    p.add_argument("--one-row", action="store_true", help=argparse.SUPPRESS)  # internal: print one JSON rate
    return p.parse_args(argv)


def endless(loader):
    """Batches across epoch ends, so a small folder still gives enough batches."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def measure(cfg: DataConfig, split: str, device: torch.device, batches: int, warmup: int) -> float:
    """Images per second of one pipeline, after ``warmup`` batches."""
    loader = build_loader(cfg, split, device=device)
    try:
        stream = endless(loader)
        for _ in range(warmup):
            next(stream)
        sync(device)
        images, start = 0, time.perf_counter()
        for _ in range(batches):
            x, _ = next(stream)
            images += x.shape[0]
        sync(device)
        return images / (time.perf_counter() - start)
    finally:
        loader.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_row(args, split: str, backend: str, workers: int, augment: str = "none") -> float:
    """One run of one row, img/s: in this process with --in-process / --one-row, else in a fresh process."""
    if args.in_process or args.one_row:
        cfg = DataConfig(
            root=args.root,
            backend=backend,
            batch_size=args.batch_size,
            num_workers=workers,
            img_size=args.img_size,
            **AUGMENTS[augment],
            **({"dali_resize": args.dali_resize} if args.dali_resize and backend == "dali" else {}),
        )
        return measure(cfg, split, torch.device(args.device), args.batches, args.warmup)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one-row",
        "--root",
        args.root,
        "--backends",
        backend,
        "--splits",
        split,
        "--workers",
        str(workers),
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
        "--batches",
        str(args.batches),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--torch-threads",
        str(args.torch_threads),
        "--augment",
        augment,
        *(["--dali-resize", args.dali_resize] if args.dali_resize else []),
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"measuring {split} {backend} workers={workers} augment={augment} failed (exit {done.returncode}); "
            f"rerun it alone: {' '.join(cmd)}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])["img_per_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    if args.one_row:
        row = (args.splits[0], args.backends[0], args.workers[0], args.augment[0])
        print(json.dumps({"img_per_s": measure_row(args, *row)}))
        return 0
    keys = [
        (split, backend, workers, augment)
        for split, backend, workers in itertools.product(args.splits, args.backends, args.workers)
        for augment in (args.augment if split == "train" else ["none"])
    ]
    runs = {key: [] for key in keys}
    for _ in range(args.rounds):  # rounds interleave the rows, so a slow spell of the machine hits all of them
        for key in keys:
            rate = measure_row(args, *key)
            runs[key].append(rate)
            print(f"measured {' '.join(map(str, key))}: {rate:.1f} img/s", file=sys.stderr)
    rows = [(*key, statistics.median(runs[key])) for key in keys]
    base = {(s, w, a): r for s, b, w, a, r in rows if b == "torchvision"}
    plain = {(s, b, w): r for s, b, w, a, r in rows if a == "none"}
    print(
        f"\nbatch {args.batch_size}, {args.img_size} px, device {device}, {os.cpu_count()} CPUs visible, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.batches} timed batches per row, "
        f"median of {args.rounds} run(s)"
        + (f", DALI rows with data.dali_resize={args.dali_resize}" if args.dali_resize else "")
    )
    print("| split | backend | workers/threads | augment | img/s | vs torchvision | ms/img over none |")
    print("|---|---|---|---|---:|---:|---:|")
    for split, backend, workers, augment, rate in rows:
        ratio = f"{rate / base[(split, workers, augment)]:.2f}x" if (split, workers, augment) in base else ""
        none = plain.get((split, backend, workers))
        cost = f"{1000 * workers * (1 / rate - 1 / none):.2f}" if none and augment != "none" else ""
        print(f"| {split} | {backend} | {workers} | {augment} | {rate:.1f} | {ratio} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
