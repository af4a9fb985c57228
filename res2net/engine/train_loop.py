"""The training loop: ``train_one_epoch(run, stop)`` steps a ``Run`` (the parts ``train_job`` builds once) from its
position to the end of its epoch.

Every step posts one small asynchronous all-reduce of (loss, stop request, fp16 skip) that is read a step later, so
all ranks agree at the same step on a non-finite loss (``NonFiniteLossError``) and on a preemption signal (the epoch
ends as 'preempted'), and the host never waits for the step it just launched.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from res2net.data.loader_base import is_read_error
from res2net.engine.amp import autocast
from res2net.engine.distributed import DistInfo
from res2net.engine.ema import ModelEma
from res2net.engine.metrics import TrainProgress
from res2net.engine.mixup import Mixup
from res2net.engine.schedule import set_lr
from res2net.engine.stop import StopRequest

__all__ = [
    "Limits",
    "NonFiniteLossError",
    "Outcome",
    "Run",
    "StepAgreement",
    "TrainState",
    "backward_micro_step",
    "optimizer_step",
    "optimizer_steps_per_epoch",
    "train_one_epoch",
]


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


@dataclass(frozen=True)
class Limits:
    """When a run stops and saves (trainer.*), in optimizer steps and epochs; 0 = never."""

    epochs: int
    max_steps: int = 0
    save_every_steps: int = 0
    save_every_epochs: int = 1


@dataclass
class Run:
    """A training run's parts, built once by ``train_job``: what the loop steps, where it stands and its rules."""

    model: nn.Module  # what runs the step: DDP and/or torch.compile around ``net``
    net: nn.Module  # the plain network: EMA, checkpoints
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module  # criterion(logits, targets, images): res2net.engine.losses
    train_loader: Any
    val_loader: Any
    state: TrainState
    lr_at: Callable[[int], float]  # the lr of a global step: a pure function of the step
    dist: DistInfo
    progress: TrainProgress
    limits: Limits
    save: Callable[[], Any]  # writes last.pth at the current position (every rank calls it)
    global_batch: int  # data.batch_size x processes x accum_steps: the batch the lr is scaled for
    amp: str = "off"
    channels_last: bool = False
    accum_steps: int = 1
    grad_clip: float = 0.0
    ema: ModelEma | None = None
    mixup: Mixup | None = None
    sync_debug: int | None = None  # torch.cuda.set_sync_debug_mode after each epoch's first step (RES2NET_SYNC_DEBUG)
    data_root: Any = None  # named when the loader fails
    steps_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps_per_epoch = optimizer_steps_per_epoch(len(self.train_loader), self.accum_steps)


def optimizer_steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps of an epoch of ``batches`` loader batches: the last one takes the batches left over."""
    return math.ceil(batches / accum_steps)


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
        loss = criterion(model(images), targets, images)
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


def _guarded(run: Run):
    """The loader's batches; a failure (e.g. a crashed worker) is reported with the position."""
    batches = iter(run.train_loader)
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except Exception as err:
            if not is_read_error(err):
                raise  # a bug, not a file: its own message and traceback
            raise RuntimeError(
                f"the training data loader failed on rank {run.dist.rank} at epoch {run.state.epoch}, batch "
                f"{run.state.step_in_epoch} of {run.steps_per_epoch} "
                f"(data.root={run.data_root}): {err}. "
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


def train_one_epoch(run: Run, stop: StopRequest) -> Outcome:
    """Train from ``run.state``'s position to the end of its epoch, advancing it after every optimizer step.

    A step accumulates the gradients of ``run.accum_steps`` loader batches (the epoch's last step those left over;
    DDP all-reduces on the last micro-batch only); the state counts optimizer steps, so a checkpoint always lies
    between two of them. Mixup (when on) turns each micro-batch's labels into soft targets at its position. Returns
    FINISHED at the epoch's end, MAX_STEPS at ``limits.max_steps``, PREEMPTED when a rank was asked to stop (one step
    after the request: see ``StepAgreement``).
    """
    state, limits, accum = run.state, run.limits, run.accum_steps
    run.model.train()
    batches_per_epoch = len(run.train_loader)
    first_batch = min(state.step_in_epoch * accum, batches_per_epoch)
    run.train_loader.set_epoch(state.epoch, first_batch)
    agreement = StepAgreement(run.dist.device, run.dist.world_size, run.scaler)
    stop_now = False

    def account(result: tuple[float, bool, bool], step: int) -> bool:
        loss_mean, stopping, skipped = result
        if not math.isfinite(loss_mean):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_mean}) at global step {step}, "
                f"{state.where(run.steps_per_epoch)}; no checkpoint was written from these weights"
            )
        state.meters["loss_sum"] += loss_mean
        state.meters["steps"] += 1
        state.meters["skipped_steps"] += int(skipped)
        run.progress.add_loss(loss_mean)
        return stopping

    def drain() -> bool:
        stopping = False
        while (result := agreement.collect()) is not None:
            stopping |= account(result, state.global_step)
        return stopping

    for batch, (images, labels) in enumerate(run.progress.batches(_guarded(run)), start=first_batch):
        micro = batch % accum
        micro_steps = min(accum, batches_per_epoch - (batch - micro))
        if micro == 0:
            lr = run.lr_at(state.global_step)
            set_lr(run.optimizer, lr)
            scale_before = _scale_before(run.scaler, run.dist.device)
            run.optimizer.zero_grad(set_to_none=True)
            loss, seen = None, 0
        targets = labels
        if run.mixup is not None:
            images, targets = run.mixup(images, labels, epoch=state.epoch, step=state.global_step, micro=micro)
        last_micro = micro == micro_steps - 1
        with _no_sync(run.model, sync=last_micro):
            micro_loss = backward_micro_step(
                run.model, images, targets, run.scaler, run.criterion, amp=run.amp, micro_steps=micro_steps
            )
        loss = micro_loss if loss is None else loss + micro_loss
        seen += images.shape[0]
        if not last_micro:
            continue
        optimizer_step(run.model, run.optimizer, run.scaler, grad_clip=run.grad_clip)
        if run.ema is not None:
            run.ema.update(run.net, state.global_step)
        state.step_in_epoch += 1
        state.global_step += 1
        agreement.post(loss / micro_steps, stop.requested, scale_before)
        if len(agreement.pending) > 1:  # step k's agreement, read while step k+1 runs
            stop_now |= account(agreement.collect(), state.global_step - 1)
        save_now = limits.save_every_steps and state.global_step % limits.save_every_steps == 0
        at_max = limits.max_steps and state.global_step >= limits.max_steps
        if state.step_in_epoch == run.steps_per_epoch or at_max or run.progress.due(state) or save_now or stop_now:
            stop_now |= drain()
        run.progress.step(state, seen, lr)
        if state.step_in_epoch == 1 and run.sync_debug is not None:
            # armed after each epoch's first step (warm-up, a new progressive size); evaluate() disarms it
            torch.cuda.set_sync_debug_mode(run.sync_debug)  # 1 warn, 2 error: scripts/gpu_check.sh
        if save_now:
            run.save()
        if stop_now:
            return Outcome.PREEMPTED
        if at_max:
            return Outcome.MAX_STEPS
    drain()
    if state.step_in_epoch != run.steps_per_epoch:
        raise RuntimeError(
            f"the training loader ended after {state.step_in_epoch} of the {run.steps_per_epoch} "
            f"steps it announced (epoch {state.epoch}, {batches_per_epoch} batches of which {accum} per step)"
        )
    return Outcome.FINISHED
