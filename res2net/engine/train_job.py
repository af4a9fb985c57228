"""A training run from a composed config: build the objects, resume, run the epochs, validate, checkpoint.

``train(cfg, run_dir, dist, stop)`` takes a ``TrainConfig`` node (res2net/config.py), the run directory and this
process's ``DistInfo``; it never reads Hydra's global state. A checkpoint written mid-epoch resumes at the next
unseen batch with the generators restored, so a deterministic run continues bit for bit as if it had never stopped.
On SIGTERM / SIGUSR1 or a first SIGINT every rank finishes its step, rank 0 writes ``last.pth`` at that position and
``train`` returns status 'preempted' (train.py exits with ``stop.exit_code_for``: 75, or 130 after Ctrl-C); a second
SIGINT or SIGKILL end the run without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from res2net.config import TrainConfig, as_train_config, check_train_config, to_dict
from res2net.data import build_loader
from res2net.data.split import describe_data
from res2net.files import atomic_write
from res2net.models import model_from_config, resolve_model_config
from res2net.models.registry import INIT_KEYS

from .amp import resolve_amp, resolve_channels_last
from .checkpoint import (
    RESUME_MAY_DIFFER,
    CheckpointError,
    CheckpointManager,
    check_compatible,
    checkpoint_dir,
    gather_rng,
    last_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_training,
    training_checkpoint,
)
from .distill import DistillationLoss, load_teacher
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, wrap_model
from .ema import ModelEma
from .eval_loop import evaluate
from .finetune import log_allowed_changes, prepare_model, start_weights
from .losses import build_criterion
from .metrics import MetricsWriter, TrainProgress, dataset_name, log_epoch
from .mixup import Mixup, mixup_enabled
from .optim import build_optimizer, scaled_lr
from .run_lock import run_dir_lock
from .schedule import learning_rate
from .stop import StopRequest
from .train_loop import (
    Limits,
    NonFiniteLossError,
    Outcome,
    Run,
    TrainState,
    optimizer_steps_per_epoch,
    train_one_epoch,
)

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)

SYNC_DEBUG_ENV = "RES2NET_SYNC_DEBUG"


@dataclass
class TrainResult:
    status: Outcome
    epoch: int  # epochs completed
    step_in_epoch: int
    global_step: int
    best_top1: float | None
    last_val: dict | None
    checkpoint: Path | None


def _check_machine(cfg: TrainConfig, dist: DistInfo) -> None:
    if cfg.trainer.sync_bn and dist.device.type != "cuda":
        raise ValueError(
            "trainer.sync_bn=true needs CUDA (SyncBatchNorm runs on GPUs only); this process has no "
            "GPU. Set trainer.sync_bn=false for CPU runs"
        )


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


def _build_model(cfg: TrainConfig, num_classes: int, dist: DistInfo, channels_last: bool) -> nn.Module:
    model = model_from_config(dataclasses.asdict(cfg.model), num_classes=num_classes)
    if cfg.trainer.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _objective(
    cfg: TrainConfig, num_classes: int, dist: DistInfo, channels_last: bool
) -> tuple[nn.Module, Mixup | None]:
    """(the loss, the batch mixer or None) of the loss / mixup / distill groups."""
    mixup = None
    if mixup_enabled(cfg.mixup):
        mixup = Mixup.from_config(
            cfg.mixup,
            label_smoothing=cfg.loss.label_smoothing,
            num_classes=num_classes,
            seed=cfg.trainer.seed,
            rank=dist.rank,
        )
    criterion = build_criterion(cfg.loss, soft_targets=mixup is not None)
    if cfg.distill.teacher:
        teacher, arch = load_teacher(cfg.distill.teacher, num_classes, dist.device, channels_last=channels_last)
        if dist.is_main:
            log.info(
                "distilling from %s (%s), alpha %g, T %g",
                cfg.distill.teacher,
                arch["name"],
                cfg.distill.alpha,
                cfg.distill.temperature,
            )
        criterion = DistillationLoss(criterion, teacher, cfg.distill.alpha, cfg.distill.temperature)
    return criterion, mixup


def _num_classes(cfg: TrainConfig, loader: Any) -> int:
    wanted = cfg.model.num_classes
    if wanted is not None and wanted != loader.num_classes:
        raise ValueError(
            f"model.num_classes={wanted} but the training data has {loader.num_classes} classes "
            f"(data.root={cfg.data.root}); set model.num_classes={loader.num_classes} or null"
        )
    return loader.num_classes


class _Saver:
    """Writes last.pth (and best / history) at the run's current position: every rank calls it, rank 0 writes."""

    def __init__(self, run_dir: Path, keep_last: int, config: dict):
        self.run_dir, self.keep_last, self.config = run_dir, keep_last, config
        self.run: Run | None = None
        self.manager: CheckpointManager | None = None
        self.saved: Path | None = None  # the latest checkpoint of this trajectory (written or resumed from)

    def __call__(self, *, is_best: bool = False, epoch_end: bool = False) -> Path:
        dist = self.run.dist
        rng = gather_rng(dist)
        error = None
        if dist.is_main:
            try:
                if self.manager is None:
                    self.manager = CheckpointManager(checkpoint_dir(self.run_dir), self.keep_last)
                self.manager.save(training_checkpoint(self.run, rng, self.config), is_best=is_best, epoch_end=epoch_end)
            except Exception as err:  # every rank must learn of it, or the others would wait in the next collective
                error = str(err)
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(error if dist.is_main else f"rank 0 failed to save a checkpoint: {error}")
        self.saved = last_checkpoint(self.run_dir)
        return self.saved


def _validate(run: Run) -> dict:
    val = evaluate(run.model, run.val_loader, device=run.dist.device, amp=run.amp, channels_last=run.channels_last)
    if run.ema is not None:
        on_ema = evaluate(
            run.ema.module, run.val_loader, device=run.dist.device, amp=run.amp, channels_last=run.channels_last
        )
        val.update({f"{key}_ema": on_ema[key] for key in ("loss", "top1", "top5")})
    return val


def _any_rank(flag: bool, device: torch.device) -> bool:
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def train(
    cfg: Any, run_dir: str | os.PathLike, dist: DistInfo | None = None, stop: StopRequest | None = None
) -> TrainResult:
    """Train as ``cfg`` says (a TrainConfig, or the node train.py composes: converted once, here), writing into
    ``run_dir`` (rank 0); returns how the run ended.

    ``stop``: an entered ``StopRequest`` to watch (train.py keeps one open until the process exits); without it,
    ``train`` installs its own for the epochs and removes it before returning.
    """
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    cfg = as_train_config(cfg)
    check_train_config(cfg)
    # One writer per run directory (rank 0 writes for all), held before any checkpoint is read or written.
    with run_dir_lock(run_dir) if dist.is_main else contextlib.nullcontext():
        with contextlib.nullcontext(stop) if stop is not None else StopRequest() as request:
            return _train(cfg, run_dir, dist, request)


def _recorded_config(cfg: TrainConfig, amp: str, channels_last: bool, device: torch.device) -> dict:
    """The config written to config.yaml and every checkpoint: the variant's values in place of null, and what
    ``auto`` became on this machine (a resume where it would resolve differently is refused by check_compatible)."""
    config = to_dict(cfg)
    # The starting-weights keys (model.pretrained / init_checkpoint) stay beside the architecture.
    config["model"] = {**resolve_model_config(config["model"]), **{k: config["model"][k] for k in INIT_KEYS}}
    config["trainer"].update(amp=amp, channels_last=channels_last, device=device.type)
    return config


def _resume_checkpoint(
    cfg: TrainConfig, run_dir: Path, config: dict, dist: DistInfo
) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume from, its contents), both None for a fresh start; refuses an incompatible one."""
    path = resolve_resume(cfg.resume, run_dir)
    if cfg.resume == "auto" and path is None and dist.is_main:
        log.warning(
            "resume=auto: no %s yet, starting fresh (to continue an earlier run, pass its directory as "
            "hydra.run.dir=...)",
            last_checkpoint(run_dir),
        )
    if path is None:
        return None, None
    ckpt = load_checkpoint(path)
    if "init" in ckpt["config"]:  # where the run's weights started, kept by every resume
        config["init"] = ckpt["config"]["init"]
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
    allowed = (*RESUME_MAY_DIFFER, *cfg.resume_allow)
    check_compatible(ckpt["config"], config, path=path, allowed=allowed, defaults=defaults)
    if dist.is_main:
        log_allowed_changes(ckpt["config"], config, cfg.resume_allow)
    return path, ckpt


def _train(cfg: TrainConfig, run_dir: Path, dist: DistInfo, stop: StopRequest) -> TrainResult:
    _check_machine(cfg, dist)
    amp = resolve_amp(cfg.trainer.amp, dist.device, "trainer.amp")
    channels_last = resolve_channels_last(cfg.trainer.channels_last, dist.device, "trainer.channels_last")
    config = _recorded_config(cfg, amp, channels_last, dist.device)
    _set_determinism(cfg.trainer.deterministic, dist.device)
    resume_path, ckpt = _resume_checkpoint(cfg, run_dir, config, dist)
    init_file = start_weights(cfg, config, ckpt, dist)  # model.pretrained / model.init_checkpoint, unless resuming
    loader_args = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.trainer.seed, device=dist.device)
    loader_args.update(channels_last=channels_last)
    train_loader = build_loader(cfg.data, "train", **loader_args)
    val_loader = writer = None
    try:
        val_loader = build_loader(cfg.data, "val", **loader_args)
        if dist.is_main:
            describe_data(cfg.data, run_dir)  # classes and image counts; data.val_split's record
        if optimizer_steps_per_epoch(len(train_loader), cfg.trainer.accum_steps) < 1:
            raise ValueError(
                f"the training loader yields no batch per epoch (fewer images per rank than "
                f"data.batch_size={cfg.data.batch_size}?); lower data.batch_size"
            )
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Atomic: a rank starting late reads config.yaml (resume=auto) while rank 0 may be rewriting it here.
            with atomic_write(run_dir / "config.yaml") as f:
                f.write(OmegaConf.to_yaml(config).encode("utf-8"))
        writer = MetricsWriter(run_dir, dist.is_main, ckpt["global_step"] if ckpt is not None else None)
        run = _build_run(cfg, config, run_dir, dist, amp, channels_last, train_loader, val_loader, writer, init_file)
        if ckpt is not None:
            restore_training(ckpt, resume_path, run)
            run.save.saved = resume_path
            log.info(
                "resumed from %s at epoch %d, step %d/%d (global step %d)",
                resume_path,
                run.state.epoch,
                run.state.step_in_epoch,
                run.steps_per_epoch,
                run.state.global_step,
            )
        else:
            _seed_all(cfg.trainer.seed + dist.rank)  # the training stream of this rank
        del ckpt
        result = _run_epochs(run, stop, writer)
        barrier()
        return result
    finally:
        if writer is not None:
            writer.close()
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()


def _ema_copy_steps(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The steps during which the EMA is reset to the weights: the lr warm-up's with trainer.ema_warmup_reset."""
    return cfg.schedule.warmup_epochs * steps_per_epoch if cfg.trainer.ema_warmup_reset else 0.0


def _build_run(
    cfg: TrainConfig,
    config: dict,
    run_dir: Path,
    dist: DistInfo,
    amp: str,
    channels_last: bool,
    train_loader: Any,
    val_loader: Any,
    writer: MetricsWriter,
    init_file: Path | None = None,
) -> Run:
    """The run's parts at its start: fresh weights (the same on every rank; or those of ``init_file``, frozen as
    trainer.freeze says), optimizer, scaler, EMA, loss, schedule."""
    t = cfg.trainer
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    num_classes = _num_classes(cfg, train_loader)
    net = _build_model(cfg, num_classes, dist, channels_last)
    prepare_model(net, cfg, init_file, dist, train_loader.classes)  # res2net/engine/finetune.py
    global_batch = cfg.data.batch_size * dist.world_size * t.accum_steps
    base_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch)
    criterion, mixup = _objective(cfg, num_classes, dist, channels_last)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), t.accum_steps)
    save = _Saver(run_dir, t.keep_last, config)
    run = Run(
        model=wrap_model(net, dist, compile=t.compile),
        net=net,
        optimizer=build_optimizer(net, cfg.optim, global_batch),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=amp == "fp16"),
        criterion=criterion,
        train_loader=train_loader,
        val_loader=val_loader,
        state=TrainState(),
        lr_at=partial(learning_rate, steps_per_epoch=steps_per_epoch, cfg=cfg.schedule, base_lr=base_lr),
        dist=dist,
        progress=TrainProgress(
            writer,
            dist.device,
            epochs=cfg.schedule.epochs,
            steps_per_epoch=steps_per_epoch,
            log_interval=t.log_interval,
            world_size=dist.world_size,
            val_steps=len(val_loader),
            dataset=dataset_name(cfg.data),
        ),
        limits=Limits(cfg.schedule.epochs, t.max_steps, t.save_every_steps, t.save_every_epochs),
        save=save,
        global_batch=global_batch,
        amp=amp,
        channels_last=channels_last,
        accum_steps=t.accum_steps,
        grad_clip=t.grad_clip,
        ema=ModelEma(net, t.ema_decay, copy_steps=_ema_copy_steps(cfg, steps_per_epoch)) if t.ema_decay > 0 else None,
        mixup=mixup,
        sync_debug=_sync_debug_mode(dist.device),
        data_root=cfg.data.root,
    )
    save.run = run
    if dist.is_main:
        _log_start(cfg, run, base_lr)
    return run


def _sync_debug_mode(device: torch.device) -> int | None:
    """RES2NET_SYNC_DEBUG (1 warn, 2 error on a host sync in the step; scripts/gpu_check.sh), read once, CUDA only."""
    value = os.environ.get(SYNC_DEBUG_ENV)
    return int(value) if value and device.type == "cuda" else None


def _log_start(cfg: TrainConfig, run: Run, base_lr: float) -> None:
    log.info(
        "%s: %.2fM parameters on %s (amp %s, channels_last %s), %d process(es) x batch %d x %d accumulated "
        "= %d, base lr %.4g, %d steps/epoch, %d epochs",
        cfg.model.name,
        sum(p.numel() for p in run.net.parameters()) / 1e6,
        run.dist.device,
        run.amp,
        run.channels_last,
        run.dist.world_size,
        cfg.data.batch_size,
        run.accum_steps,
        run.global_batch,
        base_lr,
        run.steps_per_epoch,
        run.limits.epochs,
    )


def _run_epochs(run: Run, stop: StopRequest, writer: MetricsWriter) -> TrainResult:
    """The epoch loop: train, validate, record, checkpoint by the save rules; stop at max_steps or a signal."""
    state, limits, save, val = run.state, run.limits, run.save, None

    def result(status: Outcome, checkpoint: Path | None) -> TrainResult:
        return TrainResult(
            status=status,
            epoch=state.epoch,
            step_in_epoch=state.step_in_epoch,
            global_step=state.global_step,
            best_top1=state.best_top1,
            last_val=val,
            checkpoint=checkpoint,
        )

    while state.epoch < limits.epochs:
        start = time.perf_counter()
        try:
            outcome = train_one_epoch(run, stop)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"{err}. Last good checkpoint: {save.saved or 'none written yet'}. Lower optim.lr, set "
                f"trainer.grad_clip or add warm-up (schedule.warmup_epochs), then resume=<that checkpoint> or start "
                f"again"
            ) from None
        state.meters["train_seconds"] += time.perf_counter() - start
        if outcome is Outcome.PREEMPTED:
            if run.dist.is_main:
                log.warning("stop requested by signal: checkpoint at %s", state.where(run.steps_per_epoch))
            return result(Outcome.PREEMPTED, save())
        partial_epoch = state.step_in_epoch < run.steps_per_epoch
        val_start = time.perf_counter()
        val = _validate(run)
        run.progress.validated(time.perf_counter() - val_start)
        log_epoch(
            writer,
            state,
            val,
            epochs=limits.epochs,
            lr=run.lr_at(max(state.global_step - 1, 0)),  # the schedule's, as the step records: no group's multiplier
            seconds=time.perf_counter() - start,
            global_batch=run.global_batch,
            world_size=run.dist.world_size,
            device=run.dist.device,
            partial=partial_epoch,
            dataset=run.progress.dataset,
        )
        is_best = state.best_top1 is None or val["top1"] > state.best_top1
        state.best_top1 = max(val["top1"], state.best_top1 or val["top1"])
        if not partial_epoch:
            state.next_epoch()
        scheduled = not partial_epoch and (state.epoch % limits.save_every_epochs == 0 or state.epoch == limits.epochs)
        saved = scheduled or partial_epoch or is_best or outcome is Outcome.MAX_STEPS
        if saved:
            save(is_best=is_best, epoch_end=scheduled)
        if outcome is Outcome.MAX_STEPS:
            return result(Outcome.MAX_STEPS, save.saved)
        if _any_rank(stop.requested, run.dist.device):  # a signal during validation or saving
            return result(Outcome.PREEMPTED, save.saved if saved else save())
    return result(Outcome.FINISHED, save.saved)
