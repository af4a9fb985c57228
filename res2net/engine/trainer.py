"""The training loop: DDP, AMP, EMA, per-epoch count-exact validation, checkpoints, exact resume and preemption.

``train(cfg, run_dir, dist)`` takes a composed ``TrainConfig`` node (res2net/config.py), the run directory and this
process's ``DistInfo``; it never reads Hydra's global state. Positions are (epoch, step_in_epoch, global_step): a
checkpoint written mid-epoch resumes at the next unseen batch (``loader.set_epoch(epoch, step_in_epoch)``) with the
RNG states restored, so a deterministic run continues bit for bit as if it had never stopped.

Every step ends with one small all-reduce of (loss, stop request) so that all ranks agree at the same step on a
non-finite loss (the run stops with ``NonFiniteLossError``) and on a preemption signal: SIGTERM or SIGUSR1 make
every rank finish its step, rank 0 writes ``last.pth`` at that exact position, and ``train`` returns status
'preempted' (train.py then exits with ``PREEMPTED_EXIT_CODE``). Repeats of those signals while the stop is pending
are ignored (see ``StopRequest``); SIGINT (Ctrl-C) or SIGKILL end the run without a checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from res2net.data import build_loader
from res2net.engine.evaluation import AMP_MODES, autocast, evaluate
from res2net.models import create_model

from .checkpoint import (CheckpointError, CheckpointManager, capture_rng, check_compatible, load_checkpoint,
                         model_state_dict, resolve_resume, restore_rng, unwrap_model)
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, wrap_model
from .ema import ModelEma
from .metrics import MetricsWriter, Throughput, format_eta, gpu_mem_mb, rss_mb
from .optim import build_optimizer
from .schedule import build_scheduler

__all__ = ["NonFiniteLossError", "PREEMPTED_EXIT_CODE", "StopRequest", "TrainResult", "train"]

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "temporary failure, retry". A preempted run exits with it after writing last.pth.
PREEMPTED_EXIT_CODE = 75


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the position and the last good checkpoint."""


@dataclass
class TrainResult:
    status: str  # 'finished' | 'max_steps' | 'preempted'
    epoch: int   # epochs completed
    step_in_epoch: int
    global_step: int
    best_top1: Optional[float]
    last_val: Optional[dict]
    checkpoint: Optional[Path]


class StopRequest:
    """Records SIGTERM / SIGUSR1 (SLURM's warning signal) so the loop can stop at a step boundary and checkpoint.

    Once a stop is pending, further SIGTERM / SIGUSR1 (the same signal or the other one) are ignored and only counted
    in ``repeats``: on SLURM a preemption signals every process of the job step and torchrun forwards its own copy to
    its workers, so a worker routinely gets the signal twice and must still write its checkpoint. A user who wants the
    run gone without a checkpoint sends SIGINT (Ctrl-C: ``KeyboardInterrupt``, exit code 1) or SIGKILL; resume=auto
    then continues from the previous checkpoint. Leaving the ``with`` block restores the previous handlers, so a
    caller that exits after a stop (train.py) keeps the block open until then.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.signum: Optional[int] = None
        self.repeats = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        else:  # a checkpoint is pending: a repeat must not kill the process before it is written
            self.repeats += 1

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _amp_name(value: Any) -> str:
    name = getattr(value, "value", value)
    if name not in AMP_MODES:
        raise ValueError(f"trainer.amp={name!r} is not one of {sorted(AMP_MODES)}")
    return name


def _config_dict(cfg: Any) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return dict(cfg)


def _check_runtime(cfg: Any, dist: DistInfo) -> None:
    """Refuse settings this machine cannot honour before anything is built."""
    t = cfg.trainer
    if t.sync_bn and dist.device.type != "cuda":
        raise ValueError("trainer.sync_bn=true needs CUDA (SyncBatchNorm runs on GPUs only); this process has no "
                         "GPU. Set trainer.sync_bn=false for CPU runs")
    for key in ("log_interval", "save_every_epochs"):
        if getattr(t, key) < 1:
            raise ValueError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    for key in ("save_every_steps", "keep_last", "max_steps", "grad_clip"):
        if getattr(t, key) < 0:
            raise ValueError(f"trainer.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_model(cfg: Any, num_classes: int, dist: DistInfo) -> nn.Module:
    m = cfg.model
    model = create_model(m.name, num_classes=num_classes, layers=list(m.layers), base_width=m.base_width,
                         scale=m.scale, cardinality=m.cardinality, stem=m.stem, avg_down=m.avg_down,
                         zero_init_last=m.zero_init_last, drop_rate=m.drop_rate)
    if cfg.trainer.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _num_classes(cfg: Any, loader: Any) -> int:
    wanted = cfg.model.num_classes
    if wanted is not None and wanted != loader.num_classes:
        raise ValueError(f"model.num_classes={wanted} but the training data has {loader.num_classes} classes "
                         f"(data.root={cfg.data.root}); set model.num_classes={loader.num_classes} or null")
    return loader.num_classes


class _Trainer:
    """Holds the run's objects and position; ``fit`` runs the epochs. Built by ``train``."""

    def __init__(self, cfg: Any, run_dir: Path, dist: DistInfo, train_loader, val_loader, writer: MetricsWriter):
        self.cfg, self.t, self.dist, self.device = cfg, cfg.trainer, dist, dist.device
        self.train_loader, self.val_loader, self.writer = train_loader, val_loader, writer
        self.amp = _amp_name(self.t.amp)
        self.config = _config_dict(cfg)
        self.steps_per_epoch = len(train_loader)
        self.global_batch = cfg.data.batch_size * dist.world_size
        torch.manual_seed(self.t.seed)  # the same initial weights on every rank
        self.model = _build_model(cfg, _num_classes(cfg, train_loader), dist)
        self.ema = ModelEma(self.model, self.t.ema_decay) if self.t.ema_decay > 0 else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_top1: Optional[float] = None
        self.meters = self._fresh_meters()
        self.pending_rng: Optional[dict] = None
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr of the latest step, for the records
        self.last_saved: Optional[Path] = None
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", self.t.keep_last) if dist.is_main else None
        self.last_path = run_dir / "checkpoints" / "last.pth"

    @staticmethod
    def _fresh_meters() -> dict:
        return {"loss_sum": 0.0, "steps": 0, "skipped_steps": 0, "train_seconds": 0.0}

    # -- resume / checkpoint -------------------------------------------------------------------------------------

    def load(self, ckpt: dict, path: Path) -> None:
        if ckpt["world_size"] != self.dist.world_size:
            raise ValueError(f"cannot resume from {path}: it was written by {ckpt['world_size']} processes, this run "
                             f"has {self.dist.world_size}; the data order and steps per epoch depend on it. Resume "
                             f"with {ckpt['world_size']} processes")
        try:
            unwrap_model(self.model).load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as err:
            raise ValueError(f"cannot resume from {path}: its weights do not fit model.name={self.cfg.model.name}: "
                             f"{err}") from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"cannot resume from {path} with trainer.ema_decay={self.t.ema_decay}: the "
                                 f"checkpoint has no EMA weights")
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best_top1 = ckpt["global_step"], ckpt["best_top1"]
        self.meters = dict(ckpt["meters"])
        self.pending_rng = ckpt["rng"][self.dist.rank]
        self.last_saved = path
        log.info("resumed from %s at epoch %d, step %d/%d (global step %d)", path, self.epoch, self.step_in_epoch,
                 self.steps_per_epoch, self.global_step)

    def _gather_rng(self) -> list:
        """Every rank's RNG states on rank 0 (rank r resumes with entry r)."""
        state = capture_rng()
        if self.dist.world_size == 1:
            return [state]
        gathered = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def save(self, *, is_best: bool = False, epoch_end: bool = False) -> Optional[Path]:
        """Write last.pth at the current position (all ranks call this; rank 0 writes)."""
        rng = self._gather_rng()
        error = None
        if self.dist.is_main:
            state = {"model": model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "ema": self.ema.state_dict() if self.ema is not None else None, "epoch": self.epoch,
                     "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "rng": rng,
                     "config": self.config, "best_top1": self.best_top1, "world_size": self.dist.world_size,
                     "meters": dict(self.meters)}
            try:
                self.checkpoints.save(state, is_best=is_best, epoch_end=epoch_end)
            except Exception as err:  # every rank must learn of it, or the others would wait in the next collective
                error = str(err)
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(error if self.dist.is_main else f"rank 0 failed to save a checkpoint: {error}")
        self.last_saved = self.last_path
        return self.last_saved

    # -- training ------------------------------------------------------------------------------------------------

    def _step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One optimizer step; returns the detached loss and whether the fp16 scaler skipped the update."""
        with autocast(self.device, self.amp):
            loss = self.criterion(model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        scale = self.scaler.get_scale() if self.amp == "fp16" else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # the schedule counts steps the fp16 scaler skipped, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach(), scale is not None and self.scaler.get_scale() < scale

    def _agree(self, loss: torch.Tensor, stop: StopRequest) -> tuple[float, bool]:
        """Mean loss over ranks and whether any rank was asked to stop (one all-reduce)."""
        flags = torch.stack([loss.float(), torch.tensor(float(stop.signum is not None), device=loss.device)])
        loss_sum, stops = all_reduce_sum(flags).tolist()
        return loss_sum / self.dist.world_size, stops > 0

    def _non_finite(self, loss: float) -> NonFiniteLossError:
        last = self.last_saved or "none written yet"
        return NonFiniteLossError(
            f"non-finite training loss ({loss}) at epoch {self.epoch} (0-based), step {self.step_in_epoch}/"
            f"{self.steps_per_epoch} (global step {self.global_step}); no checkpoint was written from these weights. "
            f"Last good checkpoint: {last}. Lower optim.lr, set trainer.grad_clip or add warm-up "
            f"(schedule.warmup_epochs), then resume=<that checkpoint> or start again")

    def train_epoch(self, model: nn.Module, stop: StopRequest) -> str:
        """Train from the current position to the end of the epoch; returns 'done', 'stop' or 'max_steps'."""
        model.train()
        self.train_loader.set_epoch(self.epoch, self.step_in_epoch)
        window = Throughput()
        fetch = time.perf_counter()
        for images, labels in self._batches():
            waited = time.perf_counter() - fetch
            if self.pending_rng is not None:  # after the loader drew its seeds, as the uninterrupted run had
                restore_rng(self.pending_rng)
                self.pending_rng = None
            loss, skipped = self._step(model, images, labels)
            self.step_in_epoch += 1
            self.global_step += 1
            loss_mean, stop_now = self._agree(loss, stop)
            if not math.isfinite(loss_mean):
                raise self._non_finite(loss_mean)
            self.meters["loss_sum"] += loss_mean
            self.meters["steps"] += 1
            self.meters["skipped_steps"] += int(skipped)
            window.add(images.shape[0] * self.dist.world_size, waited, loss_mean)
            if self.step_in_epoch % self.t.log_interval == 0 or self.step_in_epoch == self.steps_per_epoch:
                self._log_window(window)
                window.reset()
            if self.t.save_every_steps and self.global_step % self.t.save_every_steps == 0:
                self.save()
            if stop_now:
                return "stop"
            if self.t.max_steps and self.global_step >= self.t.max_steps:
                return "max_steps"
            fetch = time.perf_counter()
        if self.step_in_epoch != self.steps_per_epoch:
            raise RuntimeError(f"the training loader ended after {self.step_in_epoch} of the {self.steps_per_epoch} "
                               f"batches it announced (epoch {self.epoch})")
        return "done"

    def _batches(self):
        """The training loader's batches; a failure (e.g. a crashed worker) is reported with the position."""
        batches = iter(self.train_loader)
        while True:
            try:
                yield next(batches)
            except StopIteration:
                return
            except Exception as err:
                raise RuntimeError(f"the training data loader failed on rank {self.dist.rank} at epoch {self.epoch}, "
                                   f"batch {self.step_in_epoch} of {self.steps_per_epoch} (data.root="
                                   f"{self.cfg.data.root}): {err}. scripts/check_dataset.py finds unreadable "
                                   f"files; resume=auto continues from the last checkpoint") from err

    def _log_window(self, window: Throughput) -> None:
        stats = window.summary()
        record = {"kind": "train", "epoch": self.epoch, "step": self.global_step, "loss": stats["loss"],
                  "lr": self.step_lr, "img_per_s": stats["img_per_s"],
                  "data_wait_frac": stats["data_wait_frac"]}
        mem = gpu_mem_mb(self.device)
        if mem is not None:
            record["gpu_mem_mb"] = mem
        self.writer.write(record, self.global_step)
        epochs = self.cfg.schedule.epochs
        left_in_epoch = (self.steps_per_epoch - self.step_in_epoch) * stats["step_time_s"]
        left_total = left_in_epoch + (epochs - self.epoch - 1) * self.steps_per_epoch * stats["step_time_s"]
        log.info("epoch %d/%d step %d/%d  loss %.4f  lr %.4g  %.1f img/s  data %.0f%%%s  eta %s (run %s)",
                 self.epoch + 1, epochs, self.step_in_epoch, self.steps_per_epoch, stats["loss"], record["lr"],
                 stats["img_per_s"], 100 * stats["data_wait_frac"],
                 f"  mem {mem:.0f} MiB" if mem is not None else "", format_eta(left_in_epoch), format_eta(left_total))

    # -- epochs --------------------------------------------------------------------------------------------------

    def validate(self) -> dict:
        common = dict(device=self.device, amp=self.amp, channels_last=self.t.channels_last)
        val = evaluate(unwrap_model(self.model), self.val_loader, **common)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, **common)
            val.update({f"{key}_ema": ema[key] for key in ("loss", "top1", "top5")})
        return val

    def _log_epoch(self, val: dict, seconds: float, train_seconds: float, partial: bool) -> None:
        steps = max(self.meters["steps"], 1)
        record = {"kind": "epoch", "epoch": self.epoch, "train_loss": self.meters["loss_sum"] / steps,
                  "lr": self.step_lr, "val_loss": val["loss"], "val_top1": val["top1"],
                  "val_top5": val["top5"], "epoch_time_s": seconds,
                  "img_per_s": self.meters["steps"] * self.global_batch / max(train_seconds, 1e-9),
                  "global_step": self.global_step, "skipped_steps": self.meters["skipped_steps"],
                  "world_size": self.dist.world_size, "device": self.device.type}
        for key in ("loss", "top1", "top5"):
            if f"{key}_ema" in val:
                record[f"val_{key}_ema"] = val[f"{key}_ema"]
        if rss_mb() is not None:
            record["rss_mb"] = rss_mb()
        if partial:
            record["partial"] = True
        self.writer.write(record, self.global_step)
        ema = f"  ema top-1 {val['top1_ema']:.2f}" if "top1_ema" in val else ""
        log.info("epoch %d/%d done in %.1f s: train loss %.4f  val loss %.4f  top-1 %.2f  top-5 %.2f%s (%d images)",
                 self.epoch + 1, self.cfg.schedule.epochs, seconds, record["train_loss"], val["loss"], val["top1"],
                 val["top5"], ema, val["count"])

    def fit(self, model: nn.Module, stop: StopRequest) -> TrainResult:
        epochs, val = self.cfg.schedule.epochs, None
        while self.epoch < epochs:
            start = time.perf_counter()
            outcome = self.train_epoch(model, stop)
            self.meters["train_seconds"] += time.perf_counter() - start
            if outcome == "stop":
                if self.dist.is_main:
                    log.warning("stop requested by signal: checkpoint at epoch %d, step %d/%d", self.epoch,
                                self.step_in_epoch, self.steps_per_epoch)
                return self._result("preempted", val, self.save())
            if self.pending_rng is not None:  # resumed at the very end of an epoch
                restore_rng(self.pending_rng)
                self.pending_rng = None
            partial = self.step_in_epoch < self.steps_per_epoch
            val = self.validate()
            self._log_epoch(val, time.perf_counter() - start, self.meters["train_seconds"], partial)
            is_best = self.best_top1 is None or val["top1"] > self.best_top1
            self.best_top1 = max(val["top1"], self.best_top1 or val["top1"])
            if not partial:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.meters = self._fresh_meters()
            scheduled = not partial and (self.epoch % self.t.save_every_epochs == 0 or self.epoch == epochs)
            saved = scheduled or partial or is_best or outcome == "max_steps"
            if saved:
                self.save(is_best=is_best, epoch_end=scheduled)
            if outcome == "max_steps":
                return self._result("max_steps", val, self.last_saved)
            if self._any_rank(stop.signum is not None):  # a signal during validation or saving
                return self._result("preempted", val, self.last_saved if saved else self.save())
        return self._result("finished", val, self.last_saved)

    def _any_rank(self, flag: bool) -> bool:
        return all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0

    def _result(self, status: str, val: Optional[dict], checkpoint: Optional[Path]) -> TrainResult:
        return TrainResult(status=status, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                           global_step=self.global_step, best_top1=self.best_top1, last_val=val,
                           checkpoint=checkpoint)


def train(cfg: Any, run_dir: str | os.PathLike, dist: Optional[DistInfo] = None,
          stop: Optional[StopRequest] = None) -> TrainResult:
    """Train as ``cfg`` says, writing into ``run_dir`` (rank 0); returns how the run ended.

    ``stop``: an entered ``StopRequest`` to watch (train.py keeps one open until the process exits); without it,
    ``train`` installs its own for the epochs and removes it before returning.
    """
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    _check_runtime(cfg, dist)
    _set_determinism(cfg.trainer.deterministic, dist.device)
    resume_path = resolve_resume(cfg.resume, run_dir)
    if cfg.resume == "auto" and resume_path is None and dist.is_main:
        log.warning("resume=auto: no %s yet, starting fresh (to continue an earlier run, pass its directory as "
                    "hydra.run.dir=...)", run_dir / "checkpoints" / "last.pth")
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        check_compatible(ckpt["config"], _config_dict(cfg), path=resume_path)
    loader_args = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.trainer.seed, device=dist.device,
                       channels_last=cfg.trainer.channels_last)
    train_loader = build_loader(cfg.data, "train", **loader_args)
    val_loader = writer = None
    try:
        val_loader = build_loader(cfg.data, "val", **loader_args)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(_config_dict(cfg)), encoding="utf-8")
        writer = MetricsWriter(run_dir, dist.is_main, ckpt["global_step"] if ckpt is not None else None)
        trainer = _Trainer(cfg, run_dir, dist, train_loader, val_loader, writer)
        if ckpt is not None:
            trainer.load(ckpt, resume_path)
        _seed_all(cfg.trainer.seed + dist.rank)  # the training stream; a resume restores its saved state instead
        del ckpt
        log.info("%s: %.2fM parameters, %d process(es) x batch %d = %d, base lr %.4g, %d steps/epoch, %d epochs",
                 cfg.model.name, sum(p.numel() for p in trainer.model.parameters()) / 1e6, dist.world_size,
                 cfg.data.batch_size, trainer.global_batch, trainer.scheduler.base_lrs[0],
                 trainer.steps_per_epoch, cfg.schedule.epochs)
        with contextlib.nullcontext(stop) if stop is not None else StopRequest() as request:
            result = trainer.fit(wrap_model(trainer.model, dist, compile=cfg.trainer.compile), request)
        barrier()
        return result
    finally:
        if writer is not None:
            writer.close()
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
