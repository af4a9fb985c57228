"""Mixed precision and memory format: the autocast dtype of each ``amp`` mode (trainer.amp and evaluate's amp), its
context, and what ``auto`` means for ``amp`` and ``channels_last`` on a device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["AMP_DTYPES", "amp_name", "autocast", "fast_device", "resolve_amp", "resolve_channels_last"]

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_name(value: Any, key: str = "amp") -> str:
    """The mode's name from a str or the config's Amp enum (not ``auto``: see ``resolve_amp``)."""
    name = str(value)
    if name not in AMP_DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {sorted(AMP_DTYPES)}")
    return name


def fast_device(device: torch.device) -> bool:
    """A CUDA device that computes bf16 natively (Ampere and later): where ``auto`` means bf16 + channels_last."""
    if device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_amp(value: Any, device: torch.device, key: str = "amp") -> str:
    """``auto`` -> bf16 on a fast CUDA device, off elsewhere (the CPU keeps fp32); other modes as given."""
    name = str(value)
    if name == "auto":
        return "bf16" if fast_device(device) else "off"
    return amp_name(name, key)


def resolve_channels_last(
    value: Any, device: torch.device, key: str = "channels_last", inference: bool = False
) -> bool:
    """``auto`` -> channels_last on a fast CUDA device, NCHW elsewhere, except that ``inference`` (BN folded into the
    convs) also takes it on the CPU, where it was measured faster; true/false as given (bool or string)."""
    text = str(value).lower()
    if text == "auto":
        return fast_device(device) or (inference and device.type == "cpu")
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{key}={value!r} is not one of auto, true, false")


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` on ``device`` (a no-op context for off)."""
    dtype = AMP_DTYPES[amp_name(amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
