"""Run records: ``metrics.jsonl`` and TensorBoard events (rank 0 only), and the console progress line with ETA.

metrics.jsonl holds one JSON object per line: ``kind: "train"`` every ``trainer.log_interval`` steps (epoch, step
(global), loss, lr, img_per_s, data_wait_frac, gpu_mem_mb when on CUDA) and ``kind: "epoch"`` after every epoch
(epoch, train_loss, lr, val_loss, val_top1, val_top5, val_*_ema when the EMA is on, epoch_time_s, img_per_s,
global_step, rss_mb, skipped_steps (fp16 steps the GradScaler skipped), world_size, device ('cpu' | 'cuda'),
partial (true when trainer.max_steps ended the epoch early)). TensorBoard events go to ``<run dir>/tb/``, tagged
``<kind>/<field>`` (train/loss, epoch/val_top1, ...).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

__all__ = ["MetricsWriter", "Throughput", "format_eta", "gpu_mem_mb", "rss_mb"]

log = logging.getLogger(__name__)


def rss_mb() -> Optional[float]:
    """Resident memory of this process in MiB (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_mem_mb(device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated since the last reset, MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Throughput:
    """Images per second and the fraction of wall time spent waiting for data, over a window of steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0
        self.loss_sum = 0.0

    def add(self, images: int, data_wait: float, loss: float) -> None:
        self.images += images
        self.data_wait += data_wait
        self.steps += 1
        self.loss_sum += loss

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": self.loss_sum / max(self.steps, 1), "img_per_s": self.images / elapsed,
                "data_wait_frac": min(self.data_wait / elapsed, 1.0), "step_time_s": elapsed / max(self.steps, 1)}


class MetricsWriter:
    """Appends records to ``<run_dir>/metrics.jsonl`` and TensorBoard; inert on ranks other than 0.

    On resume, ``purge_after`` drops the records (and TensorBoard events) a killed run wrote past the checkpoint's
    global step, so the files describe one trajectory.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, purge_after: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if purge_after is not None:
            self._purge(purge_after)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"),
                                purge_step=None if purge_after is None else purge_after + 1)
        self.file = open(self.path, "a", encoding="utf-8")

    def _purge(self, global_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("step", record.get("global_step", 0)) <= global_step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: Mapping[str, Any], step: int) -> None:
        """One record (its ``kind`` prefixes the TensorBoard tags); numbers go to TensorBoard at ``step``."""
        if not self.enabled:
            return
        self.file.write(json.dumps(dict(record)) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
            self.enabled = False
