#!/usr/bin/env python
"""Resident memory of this process after each epoch of the DALI train and val loaders, as a table.

    python scripts/dali_rss.py --root ROOT [--epochs 30] [--batch-size 32] [--img-size 64] [--workers 2] \\
        [--stop-every 0] [--device cpu|cuda]

Each epoch runs the whole train loader and the whole val loader, as training does; --stop-every N abandons every
N-th train epoch after its first batch (what a stop at max_steps or a signal leaves behind). The last column is the
change against epoch 2's RSS: a loader that leaks shows it growing; goal: within 1% after epoch 2.
"""

import argparse
import os

import torch

from res2net.data import DataConfig, build_loader


def rss_mib() -> float:
    """This process's resident set size (VmRSS) in MiB."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/<pid>/status (Linux only)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root with train/ and val/ class folders")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--stop-every", type=int, default=0, help="abandon every N-th train epoch after one batch")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = DataConfig(
        root=args.root, backend="dali", batch_size=args.batch_size, img_size=args.img_size, num_workers=args.workers
    )
    device = torch.device(args.device)
    train, val = build_loader(cfg, "train", device=device), build_loader(cfg, "val", device=device)
    print("| epoch | RSS MiB | vs epoch 2 |\n|---:|---:|---:|")
    reference = None
    try:
        for epoch in range(args.epochs):
            train.set_epoch(epoch)
            batches = iter(train)
            if args.stop_every and epoch % args.stop_every == args.stop_every - 1:
                next(batches)  # abandoned after one batch, as train_one_epoch does on a stop
            else:
                for _ in batches:
                    pass
            del batches
            for _ in val:
                pass
            rss = rss_mib()
            reference = rss if epoch == 2 else reference
            change = "" if reference is None else f"{100 * (rss / reference - 1):+.2f}%"
            print(f"| {epoch} | {rss:.1f} | {change} |", flush=True)
    finally:
        train.close()
        val.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
