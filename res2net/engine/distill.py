"""Logit distillation (Hinton et al. 2015): the teacher network and the loss that adds its term to the task loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from res2net.models.loading import load_checkpoint_model

__all__ = ["DistillationLoss", "distillation_term", "load_teacher"]


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationLoss(nn.Module):
    """``(1 - alpha) * task(logits, targets) + alpha * distillation_term(logits, teacher(images), temperature)``.

    Called as ``loss(logits, targets, images)`` (every criterion's signature: ``res2net.engine.losses``) inside
    the student's autocast, which the teacher's forward shares.
    The teacher runs in eval mode without gradients. It is kept out of the module tree (not a submodule), so nothing
    of it reaches a state_dict or a checkpoint.
    """

    def __init__(self, task: nn.Module, teacher: nn.Module, alpha: float, temperature: float):
        super().__init__()
        self.task, self.alpha, self.temperature = task, alpha, temperature
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        task = self.task(logits, targets, images)
        return (1.0 - self.alpha) * task + self.alpha * distillation_term(logits, teacher_logits, self.temperature)


def load_teacher(
    spec: str, num_classes: int, device: torch.device, *, channels_last: bool = False
) -> tuple[nn.Module, dict]:
    """(teacher in eval mode on ``device``, its resolved model config) for ``distill.teacher``.

    ``spec``: a variant name (its released weights), a URL or the path of a checkpoint written by train.py, whose
    config names the architecture (``res2net.models.loading``); read tensors-only. The teacher must predict the
    ``num_classes`` classes of the training data.
    """
    teacher, resolved, _, _ = load_checkpoint_model(spec, key="distill.teacher")
    if teacher.num_classes != num_classes:
        raise ValueError(
            f"distill.teacher={spec!r} predicts {teacher.num_classes} classes, the training data has {num_classes}; "
            f"distil from a teacher trained on the same classes"
        )
    teacher = teacher.to(device).eval().requires_grad_(False)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher, resolved
