"""The two loops over a loader: ``train_one_epoch`` (with the small ``TrainState`` it advances) and the count-exact
``evaluate``, shared by evaluate.py and the per-epoch validation of training.

Training: every step posts one small asynchronous all-reduce of (loss, stop request, fp16 skip) that is read a step
later, so all ranks agree at the same step on a non-finite loss (``NonFiniteLossError``) and on a preemption signal
(the epoch ends as 'preempted'), and the host never waits for the step it just launched.

Evaluation: every rank runs its own shard of the validation set (shards differ by at most one image and may yield a
different number of batches), so no collective runs inside the loop. Afterwards the integer counts
(res2net.engine.eval_metrics) and the summed NLL are all-reduced and divided by the global image count: the result is
the same for any world size, unlike averaging per-rank percentages over padded shards.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from res2net.engine.amp import autocast
from res2net.engine.distill import DistillationLoss
from res2net.engine.distributed import DistInfo, unwrap_model
from res2net.engine.eval_metrics import EvalTally, class_mask, restrict
from res2net.engine.metrics import TrainProgress, progress_bar
from res2net.engine.mixup import Mixup
from res2net.engine.schedule import set_lr
from res2net.engine.stop import StopRequest

__all__ = [
    "NonFiniteLossError",
    "Outcome",
    "StepAgreement",
    "TTA_MODES",
    "TrainState",
    "backward_micro_step",
    "evaluate",
    "optimizer_step",
    "optimizer_steps_per_epoch",
    "train_one_epoch",
    "train_step",
]

PREDICTION_TOPK = 5
TTA_MODES = ("none", "flip")


class Outcome(str, enum.Enum):
    """How an epoch (``train_one_epoch``) or a run (``TrainResult.status``) ended."""

    FINISHED = "finished"  # ran to its end
    MAX_STEPS = "max_steps"  # stopped at trainer.max_steps
    PREEMPTED = "preempted"  # stopped by SIGTERM / SIGUSR1, after a checkpoint at the exact position

    def __str__(self) -> str:
        return self.value


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the position."""


def _fresh_meters() -> dict[str, float]:
    return {"loss_sum": 0.0, "steps": 0, "skipped_steps": 0, "train_seconds": 0.0}


@dataclass
class TrainState:
    """Where a run stands: the position (epoch, step in it, global step), the best val top-1 and the epoch's meters.

    Its ``state_dict`` entries are top-level keys of a train.py checkpoint.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float | None = None
    meters: dict[str, float] = field(default_factory=_fresh_meters)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "meters": dict(self.meters),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch, self.global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        self.best_top1, self.meters = saved["best_top1"], dict(saved["meters"])

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.meters = self.epoch + 1, 0, _fresh_meters()

    def where(self, steps_per_epoch: int) -> str:
        return (
            f"epoch {self.epoch} (0-based), step {self.step_in_epoch}/{steps_per_epoch} "
            f"(global step {self.global_step})"
        )


def _loss(criterion: nn.Module, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if isinstance(criterion, DistillationLoss):  # the teacher sees the same (mixed) images
        return criterion(logits, targets, images)
    return criterion(logits, targets)


def backward_micro_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    *,
    amp: str,
    micro_steps: int = 1,
) -> torch.Tensor:
    """Forward and backward of one micro-batch, adding its share (loss / ``micro_steps``) to the gradients; returns
    the detached loss. With several processes the caller decides, via DDP's ``no_sync``, whether it all-reduces."""
    with autocast(images.device, amp):
        loss = _loss(criterion, model, images, targets)
    scaler.scale(loss / micro_steps if micro_steps > 1 else loss).backward()
    return loss.detach()


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, grad_clip: float
) -> None:
    """Clip (when ``grad_clip`` > 0) and apply the accumulated gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    *,
    amp: str,
    grad_clip: float,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss. Nothing here waits for the device."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward_micro_step(model, images, labels, scaler, criterion, amp=amp)
    optimizer_step(model, optimizer, scaler, grad_clip=grad_clip)
    return loss


def optimizer_steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps of an epoch of ``batches`` loader batches: the last one takes the batches left over."""
    return math.ceil(batches / accum_steps)


def _no_sync(model: nn.Module, sync: bool):
    """DDP's ``no_sync`` on a micro-step that must not all-reduce (also through a torch.compile wrapper)."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if sync or no_sync is None else no_sync()


class StepAgreement:
    """All ranks agree on each step's mean loss and on a stop request, without the host waiting for the device.

    ``post`` launches step k's all-reduce of (loss, stop flag, fp16 skipped flag) asynchronously into one of two
    preallocated buffers and starts a copy to pinned host memory; ``collect`` reads step k's result after step k+1
    was launched, when the device has long finished it. So a non-finite loss or a stop seen at step k acts after step
    k+1, on every rank alike (a checkpoint first calls ``drain``, so it never holds weights past a bad loss unseen).
    """

    def __init__(self, device: torch.device, world_size: int, scaler: torch.amp.GradScaler):
        self.device, self.world_size, self.scaler = device, world_size, scaler
        pin = device.type == "cuda"
        self.buffers = [torch.zeros(3, device=device) for _ in range(2)]
        self.host = [torch.zeros(3, pin_memory=pin) for _ in range(2)]
        self.pending: list[tuple[int, Any, Any]] = []  # (buffer index, all-reduce work, copy-done event)
        self.turn = 0

    def post(self, loss: torch.Tensor, stop: bool, scale_before: torch.Tensor | None) -> None:
        buf = self.buffers[self.turn]
        buf[0].copy_(loss.float())
        buf[1].fill_(float(stop))
        if scale_before is not None:  # the fp16 scaler lowers its scale when it skips a step
            buf[2:3].copy_(torch.lt(self.scaler._scale, scale_before))
        else:
            buf[2].zero_()
        work = dist.all_reduce(buf, async_op=True) if self.world_size > 1 else None
        if work is not None and self.device.type == "cuda":
            work.wait()  # NCCL: the current stream waits for the reduction; the host does not
        if self.device.type == "cuda":
            self.host[self.turn].copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            event = None
        self.pending.append((self.turn, work, event))
        self.turn = 1 - self.turn

    def collect(self) -> tuple[float, bool, bool] | None:
        """The oldest posted step's (mean loss, any stop, skipped), or None when nothing is pending."""
        if not self.pending:
            return None
        turn, work, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
            values = self.host[turn].tolist()
        else:
            if work is not None:
                work.wait()
            values = self.buffers[turn].tolist()
        loss_sum, stops, skipped = values
        return loss_sum / self.world_size, stops > 0, skipped > 0


def _guarded(loader: Iterable, state: TrainState, dist: DistInfo, steps_per_epoch: int, data_root: Any):
    """The loader's batches; a failure (e.g. a crashed worker) is reported with the position."""
    batches = iter(loader)
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except Exception as err:
            raise RuntimeError(
                f"the training data loader failed on rank {dist.rank} at epoch {state.epoch}, batch "
                f"{state.step_in_epoch} of {steps_per_epoch} (data.root={data_root}): {err}. "
                f"scripts/check_dataset.py finds unreadable files; resume=auto continues from the "
                f"last checkpoint"
            ) from err


def _scale_before(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor | None:
    """A device copy of the fp16 loss scale (GradScaler's private tensor: get_scale() would wait for the device)."""
    if not scaler.is_enabled():
        return None
    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(device)
    return scaler._scale.clone()


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    ema: Any,
    state: TrainState,
    *,
    lr_at: Callable[[int], float],
    amp: str,
    grad_clip: float,
    stop: StopRequest,
    dist: DistInfo,
    progress: TrainProgress,
    max_steps: int = 0,
    save_every_steps: int = 0,
    save: Callable[[], Any] = lambda: None,
    data_root: Any = None,
    accum_steps: int = 1,
    mixup: Mixup | None = None,
) -> Outcome:
    """Train from ``state``'s position to the end of its epoch, advancing ``state`` after every optimizer step.

    ``model`` is what runs the step (DDP and/or compiled); ``ema`` (or None) follows ``unwrap_model(model)``.
    A step accumulates the gradients of ``accum_steps`` loader batches (the epoch's last step those left over;
    DDP all-reduces on the last micro-batch only); ``state`` counts optimizer steps, so a checkpoint always lies
    between two of them. ``mixup`` (or None) turns each micro-batch's labels into soft targets at its position.
    The lr of each step is ``lr_at(global_step)``, set before it. ``save()`` is called every ``save_every_steps``
    global steps (0 = never). Returns FINISHED at the epoch's end, MAX_STEPS at ``max_steps`` (0 = no cap), PREEMPTED
    when a rank was asked to stop (one step after the request: see ``StepAgreement``).
    """
    model.train()
    net = unwrap_model(model)
    batches_per_epoch = len(loader)
    steps_per_epoch = optimizer_steps_per_epoch(batches_per_epoch, accum_steps)
    first_batch = min(state.step_in_epoch * accum_steps, batches_per_epoch)
    loader.set_epoch(state.epoch, first_batch)
    agreement = StepAgreement(dist.device, dist.world_size, scaler)
    stop_now = False

    def account(result: tuple[float, bool, bool], step: int) -> bool:
        loss_mean, stopping, skipped = result
        if not math.isfinite(loss_mean):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_mean}) at global step {step}, "
                f"{state.where(steps_per_epoch)}; no checkpoint was written from these weights"
            )
        state.meters["loss_sum"] += loss_mean
        state.meters["steps"] += 1
        state.meters["skipped_steps"] += int(skipped)
        progress.add_loss(loss_mean)
        return stopping

    def drain() -> bool:
        stopping = False
        while (result := agreement.collect()) is not None:
            stopping |= account(result, state.global_step)
        return stopping

    batches = progress.batches(_guarded(loader, state, dist, steps_per_epoch, data_root))
    for batch, (images, labels) in enumerate(batches, start=first_batch):
        micro = batch % accum_steps
        micro_steps = min(accum_steps, batches_per_epoch - (batch - micro))
        if micro == 0:
            lr = lr_at(state.global_step)
            set_lr(optimizer, lr)
            scale_before = _scale_before(scaler, dist.device)
            optimizer.zero_grad(set_to_none=True)
            loss, seen = None, 0
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels, epoch=state.epoch, step=state.global_step, micro=micro)
        last_micro = micro == micro_steps - 1
        with _no_sync(model, sync=last_micro):
            micro_loss = backward_micro_step(
                model, images, targets, scaler, criterion, amp=amp, micro_steps=micro_steps
            )
        loss = micro_loss if loss is None else loss + micro_loss
        seen += images.shape[0]
        if not last_micro:
            continue
        optimizer_step(model, optimizer, scaler, grad_clip=grad_clip)
        if ema is not None:
            ema.update(net)
        state.step_in_epoch += 1
        state.global_step += 1
        agreement.post(loss / micro_steps, stop.requested, scale_before)
        if len(agreement.pending) > 1:  # step k's agreement, read while step k+1 runs
            stop_now |= account(agreement.collect(), state.global_step - 1)
        last = (
            state.step_in_epoch == steps_per_epoch
            or (max_steps and state.global_step >= max_steps)
            or progress.due(state)
            or (save_every_steps and state.global_step % save_every_steps == 0)
        )
        if last or stop_now:
            stop_now |= drain()
        progress.step(state, seen, lr)
        if state.global_step == 1 and dist.device.type == "cuda" and os.environ.get("RES2NET_SYNC_DEBUG"):
            torch.cuda.set_sync_debug_mode(int(os.environ["RES2NET_SYNC_DEBUG"]))  # 1 warn, 2 error: gpu_check.sh
        if save_every_steps and state.global_step % save_every_steps == 0:
            save()
        if stop_now:
            return Outcome.PREEMPTED
        if max_steps and state.global_step >= max_steps:
            return Outcome.MAX_STEPS
    drain()
    if state.step_in_epoch != steps_per_epoch:
        raise RuntimeError(
            f"the training loader ended after {state.step_in_epoch} of the {steps_per_epoch} "
            f"steps it announced (epoch {state.epoch}, {batches_per_epoch} batches of which {accum_steps} per step)"
        )
    return Outcome.FINISHED


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _num_classes(model: nn.Module, loader: Any) -> int:
    n = getattr(loader, "num_classes", None) or getattr(model, "num_classes", None)
    if not n:
        raise ValueError("evaluate() needs the number of classes: give the loader or the model a num_classes attribute")
    return int(n)


def _reduce_device(device: torch.device) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def _prediction_rows(paths: list[str], targets: torch.Tensor, probs: torch.Tensor) -> list[dict]:
    top = probs.topk(min(PREDICTION_TOPK, probs.shape[1]), dim=1)
    return [
        {"path": p, "target": int(t), "top5": i.tolist(), "top5_prob": v.tolist()}
        for p, t, i, v in zip(paths, targets.tolist(), top.indices.cpu(), top.values.cpu())
    ]


def _gather_predictions(rows: list[dict]) -> list[dict] | None:
    """All ranks' prediction rows on rank 0, in global sample order; None on the other ranks.

    Val shards are contiguous blocks of the sorted sample list in rank order (res2net.data.index.val_shard), so
    concatenating the ranks' rows in rank order gives the global order for any world size.
    """
    rank, world = _world()
    if world == 1:
        return rows
    gathered: list[list[dict]] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(rows, gathered, dst=0)
    if rank != 0:
        return None
    return [r for part in gathered for r in part]


def _batches(loader: Iterable, progress: bool):
    total = len(loader) if hasattr(loader, "__len__") else None
    return progress_bar(loader, desc="eval", total=total, enabled=progress and _world()[0] == 0)


def _log_probs(
    net: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    amp: str,
    channels_last: bool,
    tta: str,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(N, C) log-probabilities of the scored distribution: softmax over the allowed classes, averaged over the image
    and its mirror with tta='flip'."""
    views = [images, images.flip(3)] if tta == "flip" else [images]
    out = []
    for view in views:
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = net(view)
        out.append(restrict(logits.float(), mask).log_softmax(dim=1))
    return out[0] if len(out) == 1 else torch.stack(out).logsumexp(dim=0) - math.log(len(out))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device | str,
    amp: str = "off",
    channels_last: bool = False,
    collect_predictions: bool = False,
    progress: bool = False,
    tta: str = "none",
    class_subset: Sequence[int] | None = None,
    real_labels: torch.Tensor | None = None,
) -> dict:
    """Loss, top-1/top-5 (percent), calibration and per-class counts over the whole validation set, exact for any
    world size.

    `loader` follows the data loader protocol: iterating yields (images, labels) of this rank's shard, every image of
    the set exactly once over all ranks; `loader.paths` (when present) names this rank's images in iteration order.
    Scores are the softmax of the logits; `tta='flip'` averages it over the image and its mirror; `class_subset`
    restricts it to those class indices (ImageNet-R / -A: the arg-max over their logits). `real_labels`
    (``eval_metrics.real_label_rows`` of this rank's images, in iteration order) adds ReaL top-1/top-5.
    Returns loss and nll (both the mean negative log-likelihood), top1, top5, ece (``eval_metrics.ECE_BINS`` bins),
    count, per_class_correct, per_class_count, [real_top1, real_top5, real_count,] seconds and img_per_s (global
    images over this rank's wall time); with `collect_predictions`, 'predictions' on rank 0 (None elsewhere): one dict
    per image (path, target, top5, top5_prob) in global sample order. The model's train/eval mode is restored.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r} is not a test-time augmentation; use one of {TTA_MODES}")
    device = torch.device(device)
    net = unwrap_model(model)  # DDP's forward may broadcast buffers: uneven shards would hang in that collective
    num_classes = _num_classes(net, loader)
    mask = class_mask(num_classes, class_subset, device)
    paths = getattr(loader, "paths", None)
    paths = [] if paths is None else list(paths)
    was_training = net.training
    net.eval()

    tally = EvalTally(num_classes, device, real_labels)
    rows: list[dict] = []
    start = time.perf_counter()
    try:
        for images, targets in _batches(loader, progress):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            log_probs = _log_probs(net, images, device=device, amp=amp, channels_last=channels_last, tta=tta, mask=mask)
            if collect_predictions:
                n, seen = targets.shape[0], tally.seen
                names = paths[seen : seen + n] if paths else [f"#{seen + j}" for j in range(n)]
                rows += _prediction_rows(names, targets.cpu(), log_probs.exp().cpu())
            tally.add(log_probs, targets)
    finally:
        net.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    result = tally.result(_reduce_device(device))
    result.update(seconds=seconds, img_per_s=result["count"] / seconds if seconds > 0 else float("nan"))
    if collect_predictions:
        result["predictions"] = _gather_predictions(rows)
    return result
