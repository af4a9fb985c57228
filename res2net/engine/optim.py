"""Optimizers (SGD, AdamW, LAMB) with the linear lr scaling rule and optional weight-decay exemption of norm weights
and biases."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from res2net.config import OptimName

__all__ = ["Lamb", "build_optimizer", "param_groups", "scaled_lr"]


def scaled_lr(lr: float, global_batch: int, base_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr`` is stated for ``base_batch`` images per step."""
    if global_batch < 1 or base_batch < 1:
        raise ValueError(f"global_batch={global_batch} and optim.base_batch={base_batch} must be >= 1")
    return lr * global_batch / base_batch


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_norm_bias: bool,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One group decaying every trainable parameter, or two: decayed weights and undecayed 1-D parameters
    (biases and norm-layer weights) when ``no_decay_norm_bias``.

    ``lr_scales`` (parameter name -> lr multiplier, res2net.engine.finetune.lr_scales) splits those groups further,
    one per multiplier, each with an ``lr_scale`` entry the schedule multiplies its lr by; the weight-decay rule
    above holds in each. Parameters that do not require gradients (frozen) are in no group.
    """
    if lr_scales is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not no_decay_norm_bias:
            return [{"params": params, "weight_decay": weight_decay}]
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if no_decay_norm_bias and p.ndim <= 1 else weight_decay
        scale = float(lr_scales[name])
        group = groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, arXiv 1904.00962) as ResNet strikes back used it: timm's ``Lamb`` (NVIDIA's NvLamb).

    Per step: the gradients are divided by max(1, global grad norm / ``max_grad_norm``); Adam moments with bias
    correction give ``update = m / (sqrt(v) + eps)``; weight decay adds ``weight_decay * p`` to the update; the update
    is scaled by the trust ratio ||p|| / ||update|| (1 where either norm is 0) in groups with weight decay (the
    exempt norm weights and biases take the plain Adam update, as in timm); ``p -= lr * update``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._flat: dict[int, _FlatUpdates] = {}  # per group: where its updates are computed (not state)

    def _grad_divisor(self) -> torch.Tensor | None:
        """max(1, global grad norm / max_grad_norm) as a device tensor (no host read), or None."""
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (norm / self.max_grad_norm).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        """One step for all parameters of a group at once (torch._foreach_* ops, the trust ratios as one tensor):
        the number of kernels does not grow with the number of parameter tensors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor = self._grad_divisor()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            correction1 = 1.0 - beta1 ** group["step"]
            root_correction2 = math.sqrt(1.0 - beta2 ** group["step"])
            grads = [p.grad for p in params]
            if divisor is not None:
                grads = torch._foreach_div(grads, divisor)
            for p in params:
                if not self.state[p]:  # first step only
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, root_correction2)
            torch._foreach_add_(denom, group["eps"])
            flat = self._flat.get(index)
            if flat is None or flat.params != [id(p) for p in params]:
                flat = self._flat[index] = _FlatUpdates(params)
            updates = flat.views
            torch._foreach_copy_(updates, exp_avgs)
            torch._foreach_div_(updates, correction1)
            torch._foreach_div_(updates, denom)
            if group["weight_decay"] != 0:
                torch._foreach_add_(updates, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                flat.buffer.mul_(trust.repeat_interleave(flat.numels, output_size=flat.buffer.numel()))
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


class _FlatUpdates:
    """One flat buffer holding a group's updates, seen as one view per parameter: the trust ratios (one per
    parameter) scale it in one multiply. Built once per group (its sizes are the only tensor made from Python
    data, at the first step)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [id(p) for p in params]
        sizes = [p.numel() for p in params]
        self.buffer = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
        self.views = [v.view_as(p) for v, p in zip(self.buffer.split(sizes), params, strict=True)]
        self.numels = torch.tensor(sizes, device=params[0].device)


def build_optimizer(model: nn.Module, cfg: Any, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer of an ``optim`` config node (name, lr, base_batch, momentum, nesterov, weight_decay,
    no_decay_norm_bias, betas, eps, head_lr_mult, layer_decay) at the lr scaled to ``global_batch``.

    SGD and AdamW on CUDA use the fused kernels (one launch for all parameters; with fp16 they also skip an overflowed
    step on the device instead of asking the host); elsewhere torch's default (foreach on CPU tensors).
    """
    from .finetune import lr_scales

    name = OptimName.of(cfg.name, "optim.name")
    scales = lr_scales(model, getattr(cfg, "head_lr_mult", 1.0), getattr(cfg, "layer_decay", 1.0))
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias, scales)
    lr = scaled_lr(cfg.lr, global_batch, cfg.base_batch)
    for group in groups:  # the schedule sets lr * lr_scale every step (res2net.engine.schedule.set_lr)
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    fused = True if next(model.parameters()).is_cuda else None
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=fused
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise AssertionError(name)
