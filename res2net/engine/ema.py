"""Exponential moving average of a model's weights (buffers such as BN statistics are copied, not averaged)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; ``module`` is evaluated as is.

    ``model`` is the plain network (not a DDP or compile wrapper), the one whose state_dict a checkpoint stores.
    ``copy_steps``: for global steps below it the average is reset to the weights (torchvision's reference resets
    its EMA during the lr warm-up, ``trainer.ema_warmup_reset``); a function of the step, so a resume is exact.
    """

    def __init__(self, model: nn.Module, decay: float, copy_steps: float = 0.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay={decay} must be in (0, 1), e.g. 0.9998, or 0 to turn the EMA off")
        self.decay, self.copy_steps = decay, copy_steps
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """One fused update after global step ``step`` (0-based): a few kernel launches, not two per tensor."""
        weights = [p.detach() for p in model.parameters()]
        if step < self.copy_steps:
            torch._foreach_copy_(self._params, weights)
        else:
            torch._foreach_lerp_(self._params, weights, 1.0 - self.decay)
        torch._foreach_copy_(self._buffers, list(model.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
