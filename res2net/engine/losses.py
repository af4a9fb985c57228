"""Training losses: cross-entropy or binary cross-entropy on integer labels or on mixed soft targets, with label
smoothing (distillation from a teacher: ``res2net.engine.distill``).

Every criterion the trainer builds is called as ``criterion(logits, targets, images)``: the task losses ignore the
images, the distillation loss feeds them to its teacher; so the training loop needs to know no loss.

The arithmetic follows timm (``timm.loss``), which the tests use as the reference: label smoothing puts
``smoothing / num_classes`` on every class and ``1 - smoothing`` more on the true one; BCE thresholds soft targets when
asked and reduces by the mean over every (sample, class) pair or, with ``sum_classes``, by the sum over classes and
the mean over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from res2net.config import LossName

__all__ = ["BinaryCrossEntropy", "CrossEntropy", "SoftTargetCrossEntropy", "build_criterion", "smooth_one_hot"]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float, dtype=torch.float32) -> torch.Tensor:
    """(N, num_classes) targets: ``smoothing / num_classes`` everywhere, plus ``1 - smoothing`` at each label."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=dtype)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class CrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy on integer labels (with ``label_smoothing``), in the trainer's call signature."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(logits, targets)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a target distribution per sample, averaged over the batch."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class BinaryCrossEntropy(nn.Module):
    """One sigmoid per class against soft or integer targets (integer labels are one-hot encoded with smoothing).

    ``target_thresh``: targets above it become 1, the others 0 (None: keep them soft). ``sum_classes``: sum over the
    classes and average over the batch instead of averaging over every element.
    """

    def __init__(self, smoothing: float = 0.0, target_thresh: float | None = None, sum_classes: bool = False):
        super().__init__()
        self.smoothing, self.target_thresh, self.sum_classes = smoothing, target_thresh, sum_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if targets.shape != logits.shape:
            targets = smooth_one_hot(targets, logits.shape[-1], self.smoothing, logits.dtype)
        if self.target_thresh is not None:
            targets = targets.gt(self.target_thresh).to(targets.dtype)
        if self.sum_classes:
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
        return F.binary_cross_entropy_with_logits(logits, targets)


def build_criterion(cfg: Any, soft_targets: bool) -> nn.Module:
    """The task loss of a ``loss`` config node (name, label_smoothing, bce_target_thresh, bce_sum).

    ``soft_targets``: the batches come as mixed (N, C) targets that already hold the label smoothing (mixup on);
    otherwise as integer labels, smoothed here. Plain ce on labels is torch's cross-entropy, as before these knobs.
    """
    name = LossName.of(cfg.name, "loss.name")
    if name == "ce":
        return SoftTargetCrossEntropy() if soft_targets else CrossEntropy(label_smoothing=cfg.label_smoothing)
    if name == "bce":
        smoothing = 0.0 if soft_targets else cfg.label_smoothing
        return BinaryCrossEntropy(smoothing, cfg.bce_target_thresh, cfg.bce_sum)
    raise AssertionError(name)
