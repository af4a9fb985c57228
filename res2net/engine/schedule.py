"""The learning rate as a pure function of the global step: step, cosine or linear decay, with an optional linear
warm-up from ``warmup_lr`` (absolute, like ``min_lr``).

The factor is evaluated at the fractional epoch where a step starts, so the step schedule changes the lr exactly at
the first step of a milestone epoch and the cosine schedule is smooth across steps. Nothing is stored: a resumed run
recomputes the lr from its global step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from res2net.config import ScheduleName

__all__ = ["learning_rate", "lr_factor", "set_lr"]


def _name(cfg: Any) -> ScheduleName:
    return ScheduleName.of(cfg.name, "schedule.name")


def lr_factor(step: int, steps_per_epoch: int, cfg: Any, base_lr: float = 1.0) -> float:
    """Multiplier of ``base_lr`` for global step ``step`` (0-based) with ``steps_per_epoch`` steps per epoch."""
    epoch = step / steps_per_epoch
    name = _name(cfg)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0  # where cosine and linear end
    if name == "step":
        factor = cfg.gamma ** sum(1 for milestone in cfg.milestones if epoch >= milestone)
    elif name == "cosine":  # over all epochs, the warm-up ramping into it
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / cfg.epochs, 1.0)))
    else:  # linear: the peak at the warm-up's end, min_lr at the last epoch (FFCV's triangular schedule)
        span = cfg.epochs - cfg.warmup_epochs
        progress = min(max(epoch - cfg.warmup_epochs, 0.0) / span, 1.0) if span > 0 else 1.0
        factor = floor + (1.0 - floor) * (1.0 - progress)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        start = cfg.warmup_lr / base_lr if base_lr > 0 else 0.0
        factor = start + (factor - start) * ((step + 1) / warmup_steps)  # with start 0: the former ramp, bit for bit
    return factor


def learning_rate(step: int, steps_per_epoch: int, cfg: Any, base_lr: float) -> float:
    """The lr of global step ``step``: ``base_lr`` (already scaled to the global batch) times the schedule."""
    return base_lr * lr_factor(step, steps_per_epoch, cfg, base_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` in every group, times the group's ``lr_scale`` where it has one (per-group lr: optim.head_lr_mult,
    optim.layer_decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
