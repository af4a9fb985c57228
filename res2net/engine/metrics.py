"""Run records: ``metrics.jsonl`` and TensorBoard events (rank 0 only), and the console progress line with ETA.

metrics.jsonl holds one JSON object per line: ``kind: "train"`` every ``trainer.log_interval`` steps (epoch, step
(global), loss, lr, img_per_s, data_wait_frac, gpu_mem_mb when on CUDA) and ``kind: "epoch"`` after every epoch
(epoch, train_loss, lr, val_loss, val_top1, val_top5, val_*_ema when the EMA is on, epoch_time_s, img_per_s,
global_step, rss_mb, skipped_steps (fp16 steps the GradScaler skipped), world_size, device ('cpu' | 'cuda'),
partial (true when trainer.max_steps ended the epoch early)). TensorBoard events go to ``<run dir>/tb/``, tagged
``<kind>/<field>`` (train/loss, epoch/val_top1, ...).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from res2net.files import TMP_MARK, atomic_write

__all__ = [
    "MetricsWriter",
    "RunEta",
    "RunRecordError",
    "Throughput",
    "TrainProgress",
    "dataset_name",
    "format_eta",
    "gpu_mem_mb",
    "progress_bar",
    "rss_mb",
    "trim_records",
]

log = logging.getLogger(__name__)


def rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_mem_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def dataset_name(data: Any, testset: str = "") -> str:
    """What the console and results.json call the data set: the evaluation set (data=imagenet_r, ...), 'synthetic',
    or the name of data.root's folder (so any ImageFolder is named as its owner named it, not 'imagenet')."""
    if testset:
        return testset
    get = data.get if isinstance(data, Mapping) else lambda key: getattr(data, key, None)
    if get("backend") == "synthetic" or not get("root"):
        return "synthetic"
    return Path(str(get("root"))).expanduser().resolve().name or str(get("root"))


def progress_bar(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """A tqdm bar over ``iterable`` when stderr is a terminal and ``enabled``; the iterable itself otherwise (a log
    file or a pipe gets the plain log lines, no carriage returns)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", dynamic_ncols=True, leave=False)


class RunEta:
    """Time left in the run, steady from one log line to the next: the training step time is the mean over every
    step timed so far (the first window, with its warm-up, weighs only as much as its steps), and each epoch's
    validation costs what the last one took (before the first: ``val_steps`` forward passes at a third of a step).
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, val_steps: int = 0):
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.seconds = 0.0
        self.steps = 0
        self.val_seconds: float | None = None

    def add_window(self, seconds: float, steps: int) -> None:
        self.seconds += seconds
        self.steps += steps

    def validated(self, seconds: float) -> None:
        self.val_seconds = seconds

    @property
    def step_seconds(self) -> float:
        return self.seconds / max(self.steps, 1)

    def left(self, epoch: int, step_in_epoch: int) -> tuple[float, float]:
        """(seconds left in this epoch's training, seconds left in the run with every validation) at a position."""
        val = self.val_seconds if self.val_seconds is not None else self.val_steps * self.step_seconds / 3
        in_epoch = (self.steps_per_epoch - step_in_epoch) * self.step_seconds
        later_epochs = self.epochs - epoch - 1
        return in_epoch, in_epoch + val + later_epochs * (self.steps_per_epoch * self.step_seconds + val)


class Throughput:
    """Images per second, the fraction of wall time spent waiting for data and the mean loss, over a window of steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0
        self.loss_sum = 0.0
        self.losses = 0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait
        self.steps += 1

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "loss": self.loss_sum / max(self.losses, 1),
            "img_per_s": self.images / elapsed,
            "data_wait_frac": min(self.data_wait / elapsed, 1.0),
            "step_time_s": elapsed / max(self.steps, 1),
        }


class MetricsWriter:
    """Appends records to ``<run_dir>/metrics.jsonl`` and TensorBoard; inert on ranks other than 0.

    On resume, ``purge_after`` drops the records (and TensorBoard events) a killed run wrote past the checkpoint's
    global step, so the files describe one trajectory.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, purge_after: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        tb_dir = Path(run_dir) / "tb"
        with _reported(self.path, "trim"):
            if purge_after is not None:
                trim_records(self.path, purge_after)
        with _reported(tb_dir, "create"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir), purge_step=None if purge_after is None else purge_after + 1)
        _quiet_writer_thread(self.tb)
        with _reported(self.path, "open"):
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any], step: int) -> None:
        """One record (its ``kind`` prefixes the TensorBoard tags); numbers go to TensorBoard at ``step``."""
        if not self.enabled:
            return
        with _reported(self.path, "write"):
            self.file.write(json.dumps(dict(record)) + "\n")
            self.file.flush()
        with _reported(Path(self.tb.log_dir), "write TensorBoard events to"):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.enabled = False
            with contextlib.suppress(OSError):  # a write error is already being reported
                self.file.close()
            with contextlib.suppress(OSError):
                self.tb.close()


def _quiet_writer_thread(tb: Any) -> None:
    """TensorBoard writes events on a thread of its own. An OSError there (a full disk) is printed as that thread's
    traceback and raised again by the next add_scalar / flush, where ``_reported`` names the file: keep the thread's
    copy off the console (other threads' exceptions still reach the previous hook)."""
    writer = getattr(tb._get_file_writer().event_writer, "_async_writer", None)
    worker = getattr(writer, "_worker", None)
    if worker is None:  # another tensorboard version: its traceback stays
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not worker or not issubclass(args.exc_type, OSError):
            previous(args)

    threading.excepthook = hook


class RunRecordError(RuntimeError):
    """metrics.jsonl or the TensorBoard events could not be written (a full disk, a read-only run directory); the
    message names the file and what to do. The checkpoints written so far are intact."""


@contextlib.contextmanager
def _reported(path: Path, action: str) -> Iterator[None]:
    """Turn an OSError inside the block into a RunRecordError naming ``path``."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunRecordError(
            f"could not {action} {path}: {reason} (errno {err.errno}). Free space or make the run directory "
            f"writable, then continue with hydra.run.dir={path.parent} resume=auto (checkpoints written so far are "
            "intact)"
        ) from err


def trim_records(path: Path, global_step: int) -> None:
    """Drop the records of ``path`` (metrics.jsonl) past ``global_step``, and lines a kill cut short, by writing the
    kept ones to a new file and renaming it over ``path``: a kill at any moment leaves the old file or the new one,
    never a partial history. A killed trim's temporary file is removed first."""
    for stale in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("step", record.get("global_step", 0)) <= global_step:
            kept.append(line)
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in kept).encode("utf-8"))


class TrainProgress:
    """The training loop's console line and 'train' records: every ``log_interval`` steps and at the epoch's end,
    with loss, lr, img/s, the share of time spent waiting for data, peak GPU memory and the ETA of epoch and run."""

    def __init__(
        self,
        writer: MetricsWriter,
        device: torch.device,
        *,
        epochs: int,
        steps_per_epoch: int,
        log_interval: int,
        world_size: int,
        val_steps: int = 0,
        dataset: str = "",
    ):
        self.writer, self.device = writer, device
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.log_interval, self.world_size = log_interval, world_size
        self.dataset = dataset
        self.window = Throughput()
        self.eta = RunEta(epochs=epochs, steps_per_epoch=steps_per_epoch, val_steps=val_steps)
        self._fetch_start = time.perf_counter()
        self._waited = 0.0
        self._bar = None

    def validated(self, seconds: float) -> None:
        """Record how long this epoch's validation took (it enters the run's ETA)."""
        self.eta.validated(seconds)

    def batches(self, loader: Iterable) -> Iterator:
        """``loader``'s batches, timing how long each one was waited for."""
        self.window.reset()
        self._fetch_start = time.perf_counter()
        with self._console():
            for batch in loader:
                self._waited = time.perf_counter() - self._fetch_start
                yield batch
                self._fetch_start = time.perf_counter()

    @contextlib.contextmanager
    def _console(self):
        """On a terminal (rank 0): a bar over the epoch's steps, the log lines printed above it; else nothing."""
        if not (self.writer.enabled and sys.stderr.isatty()):
            yield
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=self.steps_per_epoch, unit="step", dynamic_ncols=True, leave=False)
        try:
            with logging_redirect_tqdm():
                yield
        finally:
            self._bar.close()
            self._bar = None

    def _update_bar(self, state: Any, loss: float | None, eta: str) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.set_description(f"epoch {state.epoch + 1}/{self.epochs} on {self.dataset}", refresh=False)
        bar.n = state.step_in_epoch
        if loss is not None:
            bar.set_postfix_str(f"loss {loss:.4f}  eta {eta}", refresh=False)
        bar.refresh()

    def due(self, state: Any) -> bool:
        """Whether the step ``state`` just finished ends a logging window."""
        return state.step_in_epoch % self.log_interval == 0 or state.step_in_epoch == self.steps_per_epoch

    def add_loss(self, loss: float) -> None:
        self.window.loss_sum += loss
        self.window.losses += 1

    def step(self, state: Any, images: int, lr: float) -> None:
        """Count one finished step of ``images`` per rank; log when the window ends (its losses already added)."""
        self.window.add(images * self.world_size, self._waited)
        if not self.due(state):
            self._update_bar(state, None, "")
            return
        stats = self.window.summary()
        record = {
            "kind": "train",
            "epoch": state.epoch,
            "step": state.global_step,
            "loss": stats["loss"],
            "lr": lr,
            "img_per_s": stats["img_per_s"],
            "data_wait_frac": stats["data_wait_frac"],
        }
        mem = gpu_mem_mb(self.device)
        if mem is not None:
            record["gpu_mem_mb"] = mem
        self.writer.write(record, state.global_step)
        self.eta.add_window(stats["step_time_s"] * self.window.steps, self.window.steps)
        left_in_epoch, left_total = self.eta.left(state.epoch, state.step_in_epoch)
        self._update_bar(state, stats["loss"], format_eta(left_total))
        log.info(
            "epoch %d/%d step %d/%d on %s  loss %.4f  lr %.4g  %.1f img/s  data %.0f%%%s  eta %s (run %s)",
            state.epoch + 1,
            self.epochs,
            state.step_in_epoch,
            self.steps_per_epoch,
            self.dataset,
            stats["loss"],
            lr,
            stats["img_per_s"],
            100 * stats["data_wait_frac"],
            f"  mem {mem:.0f} MiB" if mem is not None else "",
            format_eta(left_in_epoch),
            format_eta(left_total),
        )
        self.window.reset()


def log_epoch(
    writer: MetricsWriter,
    state: Any,
    val: Mapping[str, Any],
    *,
    epochs: int,
    lr: float,
    seconds: float,
    global_batch: int,
    world_size: int,
    device: torch.device,
    partial: bool,
    dataset: str = "",
) -> None:
    """Write the 'epoch' record of the epoch ``state`` is in (before it advances) and its console line."""
    m = state.meters
    record = {
        "kind": "epoch",
        "epoch": state.epoch,
        "train_loss": m["loss_sum"] / max(m["steps"], 1),
        "lr": lr,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "epoch_time_s": seconds,
        "img_per_s": m["steps"] * global_batch / max(m["train_seconds"], 1e-9),
        "global_step": state.global_step,
        "skipped_steps": m["skipped_steps"],
        "world_size": world_size,
        "device": device.type,
    }
    for key in ("loss", "top1", "top5"):
        if f"{key}_ema" in val:
            record[f"val_{key}_ema"] = val[f"{key}_ema"]
    if rss_mb() is not None:
        record["rss_mb"] = rss_mb()
    if partial:
        record["partial"] = True
    writer.write(record, state.global_step)
    ema = f"  ema top-1 {val['top1_ema']:.2f}" if "top1_ema" in val else ""
    log.info(
        "epoch %d/%d done in %.1f s: train loss %.4f  val loss %.4f  top-1 %.2f  top-5 %.2f%s (%d images of %s)",
        state.epoch + 1,
        epochs,
        seconds,
        record["train_loss"],
        val["loss"],
        val["top1"],
        val["top5"],
        ema,
        val["count"],
        dataset or "the validation set",
    )
