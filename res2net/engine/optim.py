"""SGD with the linear lr scaling rule and optional weight-decay exemption of norm weights and biases."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizer", "param_groups", "scaled_lr"]


def scaled_lr(lr: float, global_batch: int, base_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr`` is stated for ``base_batch`` images per step."""
    if global_batch < 1 or base_batch < 1:
        raise ValueError(f"global_batch={global_batch} and optim.base_batch={base_batch} must be >= 1")
    return lr * global_batch / base_batch


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """One group decaying every trainable parameter, or two: decayed weights and undecayed 1-D parameters
    (biases and norm-layer weights) when ``no_decay_norm_bias``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Any, global_batch: int) -> torch.optim.SGD:
    """SGD from an ``optim`` config node (lr, base_batch, momentum, nesterov, weight_decay, no_decay_norm_bias).

    On CUDA the fused kernel (one launch for all parameters; with fp16 it also skips an overflowed step on the device
    instead of asking the host); elsewhere torch's default (foreach on CPU tensors).
    """
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias),
        lr=scaled_lr(cfg.lr, global_batch, cfg.base_batch),
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=True if on_cuda else None,
    )
