"""Geometry and randomness of the train / val transforms, shared by the backends, and the one place batches are
normalized.

Every backend ships uint8 NHWC batches and ``Normalizer`` turns them into the model's input on the device: uint8
moves a quarter of float32's bytes between processes and to the GPU.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "val_resize_size",
    "eval_img_size",
    "train_img_size",
    "val_resized_shape",
    "center_crop_offset",
    "augmentation_draws",
    "random_resized_crop_box",
    "Normalizer",
    "NUM_DRAWS",
    "host_to_device",
    "sample_uniforms",
]


def val_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: floor(img_size / crop_pct) (256 for 224 / 0.875), as timm computes it."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(img_size / crop_pct))


def eval_img_size(img_size: int, val_img_size: int | None) -> int:
    """The val crop: data.val_img_size, or data.img_size when that is null."""
    return img_size if val_img_size is None else val_img_size


def train_img_size(
    img_size: int, sizes: Sequence[int] | None, epochs: Sequence[int] | None, step: int, epoch: int
) -> int:
    """The train resolution of ``epoch``: ``img_size`` without progressive resizing, else FFCV's schedule: sizes[0]
    up to epochs[0], sizes[1] from epochs[1] on, linear in between rounded to a multiple of ``step``."""
    if sizes is None:
        return img_size
    (lo, hi), (start, end) = sizes, epochs
    if epoch <= start:
        return lo
    if epoch >= end:
        return hi
    return int(round((lo + (hi - lo) * (epoch - start) / (end - start)) / step)) * step


def val_resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``short``; the long side is truncated like torchvision."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_offset(size: int, crop: int) -> int:
    """torchvision's center-crop offset: int(round((size - crop) / 2)) with Python's round-half-to-even."""
    return int(round((size - crop) / 2.0))


RRC_ATTEMPTS = 10
# Layout of one sample's augmentation draws (see ``augmentation_draws``).
DRAW_AREA, DRAW_ASPECT = slice(0, RRC_ATTEMPTS), slice(RRC_ATTEMPTS, 2 * RRC_ATTEMPTS)
DRAW_TOP, DRAW_LEFT, DRAW_FLIP, DRAW_RATIO_MIN, DRAW_RATIO_MAX = range(2 * RRC_ATTEMPTS, 2 * RRC_ATTEMPTS + 5)
NUM_DRAWS = 2 * RRC_ATTEMPTS + 5


_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic): a well-mixed hash of each element."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, positions: np.ndarray, count: int, first: int = 0) -> np.ndarray:
    """[len(positions), count] uniforms in [0, 1) that depend only on (seed, epoch, position, index) for the
    indices first .. first + count - 1: a counter-based generator, so any batch can be drawn on its own, in any
    process, vectorized. Index ranges: [0, NUM_DRAWS) crops and flips, then augment.py's layout."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    key = _mix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _mix64(key ^ np.uint64(epoch & _MASK64))
    z = _mix64(key ^ np.asarray(positions, dtype=np.uint64)[:, None])
    z = _mix64(z ^ np.arange(first, first + count, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def augmentation_draws(
    seed: int, epoch: int, positions: np.ndarray, scale: Sequence[float], ratio: Sequence[float], hflip: float
) -> np.ndarray:
    """Everything random about the training samples at ``positions`` of the epoch's order, as a float64
    [len(positions), NUM_DRAWS] array that does not depend on the images: the area fraction and aspect ratio of
    each RandomResizedCrop attempt, uniforms for the crop position, the flip (1.0 or 0.0) and the ratio bounds of
    the fallback crop. Both backends turn a row into the same crop box (``random_resized_crop_box`` here, the same
    arithmetic in the DALI graph)."""
    u = sample_uniforms(seed, epoch, positions, NUM_DRAWS)
    draws = np.empty_like(u)
    draws[:, DRAW_AREA] = scale[0] + (scale[1] - scale[0]) * u[:, DRAW_AREA]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    draws[:, DRAW_ASPECT] = np.exp(log_lo + (log_hi - log_lo) * u[:, DRAW_ASPECT])
    draws[:, DRAW_TOP], draws[:, DRAW_LEFT] = u[:, DRAW_TOP], u[:, DRAW_LEFT]
    draws[:, DRAW_FLIP] = u[:, DRAW_FLIP] < hflip
    draws[:, DRAW_RATIO_MIN], draws[:, DRAW_RATIO_MAX] = ratio[0], ratio[1]
    return draws


def _round(x: float) -> int:
    """Half-up rounding; the DALI graph computes floor(x + 0.5) too (torchvision's round() differs only on ties)."""
    return int(math.floor(x + 0.5))


def random_resized_crop_box(draws: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): torchvision's RandomResizedCrop algorithm (the first of 10 attempts that fits,
    else a center crop clamped to the ratio range) evaluated on ``augmentation_draws``."""
    area = float(height * width)
    for k in range(RRC_ATTEMPTS):
        target_area = area * draws[DRAW_AREA][k]
        aspect = draws[DRAW_ASPECT][k]
        w = _round(math.sqrt(target_area * aspect))
        h = _round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(math.floor(draws[DRAW_TOP] * (height - h + 1)))
            left = int(math.floor(draws[DRAW_LEFT] * (width - w + 1)))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < draws[DRAW_RATIO_MIN]:
        w, h = width, _round(width / draws[DRAW_RATIO_MIN])
    elif in_ratio > draws[DRAW_RATIO_MAX]:
        h, w = height, _round(height * draws[DRAW_RATIO_MAX])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (a batch's parameters drawn on the CPU) on ``device`` in one copy that does not block the host:
    pinned first for a GPU, since a copy from pageable memory waits for the GPU's stream."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class Normalizer:
    """uint8 NHWC batch (any device) -> normalized NCHW batch on ``device`` in ``dtype`` (channels_last if asked)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype, channels_last: bool
    ):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(
                f"data.mean and data.std need 3 values each (std > 0), got mean={list(mean)}, std={list(std)}"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(device)

    def __call__(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor:
        x = images_nhwc_u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        # Elementwise ops keep the permuted (channels_last) strides, so that layout costs no extra pass. NCHW is
        # transposed while still uint8 (a quarter of float32's bytes to move). In place after the one float
        # conversion to save a batch-sized allocation.
        if not self.channels_last:
            x = x.contiguous()
        return x.float().mul_(self.scale).add_(self.shift).to(self.dtype)
