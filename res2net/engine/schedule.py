"""Learning-rate schedules as a per-step factor of the (scaled) base lr, driven by torch's LambdaLR.

The factor is evaluated at the fractional epoch where a step starts, so the step schedule changes the lr exactly at
the first step of a milestone epoch and the cosine schedule is smooth across steps. A linear warm-up multiplies
either schedule during its first ``warmup_epochs``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

__all__ = ["SCHEDULES", "build_scheduler", "lr_factor"]

SCHEDULES = ("step", "cosine")


def _name(cfg: Any) -> str:
    name = getattr(cfg.name, "value", cfg.name)  # an Enum in the structured config, a str elsewhere
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is not one of {SCHEDULES}")
    return name


def lr_factor(step: int, steps_per_epoch: int, cfg: Any, base_lr: float = 1.0) -> float:
    """Multiplier of ``base_lr`` for global step ``step`` (0-based) with ``steps_per_epoch`` steps per epoch."""
    epoch = step / steps_per_epoch
    if _name(cfg) == "step":
        factor = cfg.gamma ** sum(1 for milestone in cfg.milestones if epoch >= milestone)
    else:
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        progress = min(epoch / cfg.epochs, 1.0)
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped once per optimizer step; its state_dict holds the step count for resume."""
    if steps_per_epoch < 1:
        raise ValueError(f"the training loader yields {steps_per_epoch} batches per epoch; it needs at least one "
                         f"(fewer images per rank than data.batch_size?)")
    if cfg.epochs < 1 or cfg.warmup_epochs < 0:
        raise ValueError(f"schedule.epochs={cfg.epochs} must be >= 1 and "
                         f"schedule.warmup_epochs={cfg.warmup_epochs} >= 0")
    if _name(cfg) == "step" and list(cfg.milestones) != sorted(cfg.milestones):
        raise ValueError(f"schedule.milestones={list(cfg.milestones)} must be increasing")
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps_per_epoch=steps_per_epoch, cfg=cfg, base_lr=base_lr))
