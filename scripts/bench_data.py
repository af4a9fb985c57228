#!/usr/bin/env python
"""Images/s of the data backends (train and val pipelines) on the same folder and cores, as a table.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \\
    python scripts/bench_data.py --root ROOT [--backends torchvision dali] [--splits train val] \\
        [--workers 2 4] [--batch-size 64] [--img-size 224] [--batches 30] [--warmup 5] [--device cpu|cuda] \\
        [--rounds 3] [--in-process] [--augment none rand-m9-mstd0.5-inc1 ta_wide original jitter erasing] \\
        [--shards DIR [--formats folder wds]] [--startup]

--workers takes several values to tune the worker / thread count: for torchvision it is the number of DataLoader
worker processes, for DALI the pipeline's CPU threads. Each row warms up first, then times --batches batches
(running over epoch ends when the split is small), normalized batches on the device included. Each run of a row is
a fresh Python process, so that one backend's leftovers (DALI's buffers and threads, forked DataLoader workers) do
not slow the next (--in-process: all in this one); --rounds rounds go over all rows in turn and each row reports
its median, so a slow spell of the machine hits every row. Run it on a quiet machine: other processes on the same
cores change the numbers (on a shared 2-core VM, single runs vary by +-15%).

--augment adds train rows per augmentation (AUGMENTS below: an auto_augment policy, colour jitter 0.4, random
erasing 0.25) and a column with its cost per image over the same backend's 'none' row, in ms of one worker / thread.

--shards DIR (scripts/make_shards.py --root ROOT --out DIR) adds rows reading the same images from WebDataset shards
(--formats folder wds: both, the default with --shards), each shard row beside its folder row. --startup reports,
instead of img/s, the seconds from nothing to the first train batch (listing the class folders or reading the
shard manifest and index files, building the loader, the first batch) and the files the process opened for it.
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
    p.add_argument("--shards", help="make_shards.py output of the same --root: adds data.format=wds rows")
    p.add_argument("--formats", nargs="+", default=None, choices=["folder", "wds"], help="default: both with --shards")
    p.add_argument("--startup", action="store_true", help="time to the first train batch, and files opened")
    p.add_argument("--one-row", action="store_true", help=argparse.SUPPRESS)  # internal: print one JSON rate
    args = p.parse_args(argv)
    if args.formats is None:
        args.formats = ["folder", "wds"] if args.shards else ["folder"]
    if "wds" in args.formats and not args.shards:
        p.error("--formats wds needs --shards DIR (scripts/make_shards.py --root ROOT --out DIR)")
    return args


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


def measure_startup(cfg: DataConfig, device: torch.device) -> dict:
    """Seconds from nothing to the first train batch, and the files opened meanwhile (Python's 'open' audit
    events: the folder listing's and PIL's opens, the shard index's; DALI's own C++ opens are not seen)."""
    opened = []
    sys.addaudithook(lambda event, info: opened.append(info[0]) if event == "open" else None)
    start = time.perf_counter()
    loader = build_loader(cfg, "train", device=device)
    next(iter(loader))
    seconds = time.perf_counter() - start
    loader.close()
    data = [p for p in opened if isinstance(p, str) and p.startswith((cfg.root or "\0", str(cfg.train_shards)))]
    return {"img_per_s": seconds, "files": len(set(data))}


def row_config(args, backend: str, workers: int, augment: str, fmt: str) -> DataConfig:
    shards = {"format": "wds", "train_shards": args.shards, "val_shards": args.shards} if fmt == "wds" else {}
    return DataConfig(
        root=args.root,
        backend=backend,
        batch_size=args.batch_size,
        num_workers=workers,
        img_size=args.img_size,
        **AUGMENTS[augment],
        **shards,
        **({"dali_resize": args.dali_resize} if args.dali_resize and backend == "dali" else {}),
    )


def measure_row(args, split: str, backend: str, workers: int, augment: str = "none", fmt: str = "folder") -> float:
    """One run of one row, img/s (--startup: seconds): in this process with --in-process / --one-row, else in a fresh
    process."""
    if args.in_process or args.one_row:
        cfg = row_config(args, backend, workers, augment, fmt)
        if args.startup:
            result = measure_startup(cfg, torch.device(args.device))
            print(f"files opened: {result['files']}", file=sys.stderr)
            return result["img_per_s"]
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
        *(["--shards", args.shards, "--formats", fmt] if args.shards else []),
        *(["--startup"] if args.startup else []),
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if args.startup:
        print(f"{fmt} {backend}: {done.stdout.strip().splitlines()[-1] if done.stdout else ''}", file=sys.stderr)
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
        row = (args.splits[0], args.backends[0], args.workers[0], args.augment[0], args.formats[0])
        print(json.dumps({"img_per_s": measure_row(args, *row)}))
        return 0
    keys = [
        (split, backend, workers, augment, fmt)
        for split, backend, workers in itertools.product(
            ["train"] if args.startup else args.splits, args.backends, args.workers
        )
        for augment in (args.augment if split == "train" else ["none"])
        for fmt in args.formats
    ]
    runs = {key: [] for key in keys}
    for _ in range(args.rounds):  # rounds interleave the rows, so a slow spell of the machine hits all of them
        for key in keys:
            rate = measure_row(args, *key)
            runs[key].append(rate)
            print(f"measured {' '.join(map(str, key))}: {rate:.1f} img/s", file=sys.stderr)
    rows = [(*key, statistics.median(runs[key])) for key in keys]
    if args.startup:
        print(
            f"\nseconds to the first train batch, median of {args.rounds} run(s), CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}"
        )
        print("| format | backend | workers/threads | seconds | vs folder |")
        print("|---|---|---:|---:|---:|")
        folder = {(b, w): r for _, b, w, _, f, r in rows if f == "folder"}
        for _, backend, workers, _, fmt, rate in rows:
            ratio = f"{rate / folder[(backend, workers)]:.2f}x" if (backend, workers) in folder else ""
            print(f"| {fmt} | {backend} | {workers} | {rate:.2f} | {ratio} |")
        return 0
    base = {(s, w, a, f): r for s, b, w, a, f, r in rows if b == "torchvision"}
    folder = {(s, b, w, a): r for s, b, w, a, f, r in rows if f == "folder"}
    plain = {(s, b, w, f): r for s, b, w, a, f, r in rows if a == "none"}
    print(
        f"\nbatch {args.batch_size}, {args.img_size} px, device {device}, {os.cpu_count()} CPUs visible, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.batches} timed batches per row, "
        f"median of {args.rounds} run(s)"
        + (f", DALI rows with data.dali_resize={args.dali_resize}" if args.dali_resize else "")
    )
    columns = ["split", "format", "backend", "workers/threads", "augment", "img/s", "vs torchvision", "vs folder"]
    print("| " + " | ".join([*columns, "ms/img over none"]) + " |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for split, backend, workers, augment, fmt, rate in rows:
        key = (split, workers, augment, fmt)
        ratio = f"{rate / base[key]:.2f}x" if key in base else ""
        same = folder.get((split, backend, workers, augment))
        vs_folder = f"{rate / same:.2f}x" if same and fmt != "folder" else ""
        none = plain.get((split, backend, workers, fmt))
        cost = f"{1000 * workers * (1 / rate - 1 / none):.2f}" if none and augment != "none" else ""
        print(f"| {split} | {fmt} | {backend} | {workers} | {augment} | {rate:.1f} | {ratio} | {vs_folder} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
