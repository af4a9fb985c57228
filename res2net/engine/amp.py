"""Mixed precision: the autocast dtype of each ``amp`` mode (trainer.amp and evaluate's amp) and its context."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["AMP_DTYPES", "amp_name", "autocast"]

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_name(value: Any, key: str = "amp") -> str:
    """The mode's name from a str or the config's Amp enum; ValueError naming ``key`` and the modes otherwise."""
    name = getattr(value, "value", value)
    if name not in AMP_DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {sorted(AMP_DTYPES)}")
    return name


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` on ``device`` (a no-op context for off)."""
    dtype = AMP_DTYPES[amp_name(amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
