"""Geometry of the train / val transforms, shared by the backends, and the one place batches are normalized.

Every backend ships uint8 NHWC batches and ``Normalizer`` turns them into the model's input on the device: moving
uint8 instead of float between processes and to the GPU is 4x less traffic (DESIGN.md: the fastest torchvision path).
"""
import math
from typing import Sequence, Tuple

import numpy as np
import torch

__all__ = ["val_resize_size", "val_resized_shape", "center_crop_offset", "random_resized_crop_box", "Normalizer"]


def val_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: floor(img_size / crop_pct) (256 for 224 / 0.875), as timm computes it."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(img_size / crop_pct))


def val_resized_shape(height: int, width: int, short: int) -> Tuple[int, int]:
    """(height, width) after resizing the shorter side to ``short``; the long side is truncated like torchvision."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_offset(size: int, crop: int) -> int:
    """torchvision's center-crop offset: int(round((size - crop) / 2)) with Python's round-half-to-even."""
    return int(round((size - crop) / 2.0))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a RandomResizedCrop: torchvision's algorithm (10 tries, then a center crop
    clamped to the ratio range), drawing from ``rng`` so the box depends only on the sample's seed."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Normalizer:
    """uint8 NHWC batch (any device) -> normalized NCHW batch on ``device`` in ``dtype`` (channels_last if asked)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype,
                 channels_last: bool):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"data.mean and data.std need 3 values each (std > 0), got mean={list(mean)}, "
                             f"std={list(std)}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(device)

    def __call__(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor:
        x = images_nhwc_u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        # Elementwise ops keep the permuted (channels_last) strides, so that layout costs no extra pass; in place
        # after the one float conversion to save a batch-sized allocation.
        x = x.float().mul_(self.scale).add_(self.shift).to(self.dtype)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)
