"""A checkpoint's declared architecture is checked against its own tensors before the model is built.

A train.py checkpoint records the model config it was trained with, and code that builds a model from a checkpoint
(evaluation, the distillation teacher, export) builds that config. A damaged or hostile file can declare any
architecture (``base_width=2048``, ``num_classes=10**7``) next to small tensors; building it first allocated
gigabytes (or failed allocating 82 GB) before the weights were looked at. ``check_declared_architecture`` builds the
declared network on PyTorch's meta device (shapes only, no storage) and compares its parameter and buffer shapes with
the checkpoint's tensors, so a mismatch is the usual key report naming the file, and nothing was allocated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from res2net.errors import CheckpointError

from .pretrained import _key_report
from .registry import model_from_config

__all__ = ["check_declared_architecture"]


def _declared_branches(model_cfg: Mapping) -> int | None:
    """Blocks times Res2Net branches the config declares (each branch holds at least a conv and a BatchNorm, so a
    checkpoint of that network has at least this many tensors); None when the values are not plain integers (the
    model's own argument checks report those)."""
    layers, scale = model_cfg.get("layers"), model_cfg.get("scale")
    if not isinstance(layers, Sequence) or not all(isinstance(n, int) for n in layers) or not isinstance(scale, int):
        return None
    return sum(max(n, 0) for n in layers) * max(scale - 1, 1)


def check_declared_architecture(model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    """Raise CheckpointError (naming ``origin``) when the network ``model_cfg`` declares (a resolved model config,
    num_classes set) does not have exactly the parameter and buffer shapes of ``state_dict``; allocates no weights.
    The network's module count is bounded by the checkpoint's tensor count first, so even building on the meta
    device stays cheap."""
    branches = _declared_branches(model_cfg)
    if branches is not None and branches > len(state_dict):
        raise CheckpointError(
            f"{origin} declares layers={list(model_cfg['layers'])}, scale={model_cfg['scale']} ({branches} "
            f"branches), more than its {len(state_dict)} tensors can hold; the file is damaged or not what it says. "
            "Use a checkpoint written by train.py or export.py, or the released weights"
        )
    with torch.device("meta"):
        declared = model_from_config(model_cfg)
    report = _key_report(declared, state_dict, origin)
    if report:
        knobs = ", ".join(f"{k}={v}" for k, v in model_cfg.items())
        raise CheckpointError(f"{report}\nThe architecture compared (nothing was built): {knobs}")
