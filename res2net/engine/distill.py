"""Logit distillation (Hinton et al. 2015): the teacher network and the loss that adds its term to the task loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from res2net.models import VARIANTS

from .distributed import DistInfo

__all__ = ["DistillationLoss", "distillation_term", "load_teacher"]


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationLoss(nn.Module):
    """``(1 - alpha) * task(logits, targets) + alpha * distillation_term(logits, teacher(images), temperature)``.

    Called as ``loss(logits, targets, images)`` inside the student's autocast, which the teacher's forward shares.
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
        task = self.task(logits, targets)
        return (1.0 - self.alpha) * task + self.alpha * distillation_term(logits, teacher_logits, self.temperature)


def _saved_model(checkpoint: Mapping) -> Mapping | None:
    config = checkpoint.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    return model if isinstance(model, Mapping) and model.get("name") else None


def load_teacher(spec: str, num_classes: int, dist: DistInfo, *, channels_last: bool = False) -> tuple[nn.Module, dict]:
    """(teacher in eval mode on ``dist.device``, its resolved model config) for ``distill.teacher``.

    ``spec``: a variant name (its released weights, downloaded into the cache by rank 0) or the path of a checkpoint
    written by train.py, whose config names the architecture. Either file is read tensors-only. The teacher must
    predict the ``num_classes`` classes of the training data.
    """
    from .eval_job import build_model_for, read_checkpoint, resolve_checkpoint  # eval_job imports the loops

    if spec in VARIANTS:
        path, model_cfg = resolve_checkpoint("released", spec, dist), {"name": spec}
    else:
        path = resolve_checkpoint(spec, "", dist)
        model_cfg = {}
    checkpoint = read_checkpoint(path, trusted=False)
    if not model_cfg and _saved_model(checkpoint) is None:
        raise ValueError(
            f"distill.teacher={spec!r}: the file records no architecture (it is not a train.py checkpoint); pass a "
            f"variant name ({', '.join(sorted(VARIANTS))}) for released weights, or a checkpoint train.py wrote"
        )
    teacher, resolved = build_model_for(model_cfg, checkpoint, origin=f"distill.teacher={spec!r} ({path})")
    if teacher.num_classes != num_classes:
        raise ValueError(
            f"distill.teacher={spec!r} predicts {teacher.num_classes} classes, the training data has {num_classes}; "
            f"distil from a teacher trained on the same classes"
        )
    teacher = teacher.to(dist.device).eval().requires_grad_(False)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher, resolved
