"""Mixup and CutMix of a batch on its device, after the loader, with reproducible draws.

timm's ``timm.data.Mixup`` arithmetic (the tests compare against it): the batch is mixed with itself reversed;
in 'batch' mode one draw decides mixup or cutmix, lambda and the box for every sample, in 'pair' mode one per pair
(i, n - 1 - i), in 'elem' mode one per sample; cutmix's lambda is corrected to the pasted box's area; the targets are
``lam * smooth(y) + (1 - lam) * smooth(y reversed)``.

The draws come from a numpy generator seeded with (seed, rank, global step, micro-step) for every batch, not from
the global generators, so they depend only on the batch's position: a run resumed at any step mixes exactly as the
uninterrupted one, whatever else drew random numbers before. The images are mixed on their device by a fixed number
of ops per batch; the host only draws a few scalars per batch (or per sample), sent in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from res2net.config import MixupMode
from res2net.data.transforms import host_to_device

from .losses import smooth_one_hot

__all__ = ["Mixup", "MixDraw", "mixup_enabled"]

_STREAM = 0x6D1C  # separates this stream from any other seeded with the same (seed, rank, step)


def mixup_enabled(cfg: Any) -> bool:
    """Whether a ``mixup`` config node mixes at all (alpha > 0 or cutmix_alpha > 0)."""
    return cfg.alpha > 0.0 or cfg.cutmix_alpha > 0.0


@dataclass
class MixDraw:
    """What one batch gets: per sample (or one for all) lambda, whether it is a cutmix, and the cutmix boxes."""

    lam: np.ndarray  # (k,) float64, k = 1 ('batch'), n // 2 ('pair') or n ('elem')
    cutmix: np.ndarray  # (k,) bool
    boxes: np.ndarray  # (k, 4) int64: y0, y1, x0, x1 (empty where not cutmix)


class Mixup:
    """``mixup(images, labels, epoch=, step=, micro=)`` -> (mixed images, (N, num_classes) soft targets).

    From epoch ``off_epoch`` on (when > 0), images pass unchanged and the targets are the smoothed one-hot labels.
    """

    def __init__(
        self,
        *,
        alpha: float,
        cutmix_alpha: float,
        prob: float,
        switch_prob: float,
        mode: str,
        off_epoch: int,
        label_smoothing: float,
        num_classes: int,
        seed: int,
        rank: int,
    ):
        if alpha <= 0.0 and cutmix_alpha <= 0.0:
            raise ValueError("Mixup needs mixup.alpha > 0 or mixup.cutmix_alpha > 0")
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup.mode={mode!r} is not one of ('batch', 'pair', 'elem')")
        self.alpha, self.cutmix_alpha, self.prob, self.switch_prob = alpha, cutmix_alpha, prob, switch_prob
        self.mode, self.off_epoch = mode, off_epoch
        self.smoothing, self.num_classes = label_smoothing, num_classes
        self.seed, self.rank = seed, rank

    @classmethod
    def from_config(cls, cfg: Any, *, label_smoothing: float, num_classes: int, seed: int, rank: int) -> Mixup:
        """From a ``mixup`` config node (res2net.config.MixupConfig)."""
        return cls(
            alpha=cfg.alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            prob=cfg.prob,
            switch_prob=cfg.switch_prob,
            mode=str(MixupMode.of(cfg.mode, "mixup.mode")),
            off_epoch=cfg.off_epoch,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            seed=seed,
            rank=rank,
        )

    def generator(self, step: int, micro: int) -> np.random.Generator:
        """The generator of the batch at global step ``step``, micro-step ``micro`` (counter-based: no state)."""
        return np.random.default_rng([self.seed, self.rank, step, micro, _STREAM])

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int) -> MixDraw:
        """lambda, the mixup/cutmix choice and the boxes for one batch of ``batch`` images of height x width."""
        count = {"batch": 1, "pair": batch // 2, "elem": batch}[self.mode]
        both = self.alpha > 0.0 and self.cutmix_alpha > 0.0
        cutmix = rng.random(count) < self.switch_prob if both else np.full(count, self.alpha <= 0.0)
        lam_mix = rng.beta(self.alpha or 1.0, self.alpha or 1.0, count)
        lam_cut = rng.beta(self.cutmix_alpha or 1.0, self.cutmix_alpha or 1.0, count)
        mixed = rng.random(count) < self.prob
        lam = np.where(mixed, np.where(cutmix, lam_cut, lam_mix), 1.0)
        cutmix &= mixed
        boxes = np.zeros((count, 4), dtype=np.int64)
        centres = rng.integers(0, [height, width], size=(count, 2))
        for i in np.flatnonzero(cutmix):
            boxes[i], lam[i] = _cutmix_box(lam[i], centres[i], height, width)
        return MixDraw(lam=lam, cutmix=cutmix, boxes=boxes)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.off_epoch and epoch >= self.off_epoch:
            return images, smooth_one_hot(labels, self.num_classes, self.smoothing)
        batch, _, height, width = images.shape
        if self.mode == "pair" and batch % 2:
            raise ValueError(f"mixup.mode=pair needs an even batch, got {batch}; change data.batch_size")
        draw = self.draw(self.generator(step, micro), batch, height, width)
        lam = self._per_sample(draw.lam, batch)
        cut = self._per_sample(draw.cutmix, batch)
        weight = np.where(cut, 1.0, lam)  # mixup's weight of the image itself; 1 under a cutmix box's paste
        # Per-sample lambda, weight and box: one host-to-device copy per batch.
        packed = np.column_stack([lam, weight, self._per_sample_boxes(draw.boxes, batch)]).astype(np.float32)
        params = host_to_device(torch.from_numpy(packed), images.device)
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        lam_t = params[:, :1].to(targets.dtype)
        mixed = self._mix(images, draw, params) if not np.all(lam == 1.0) else images  # prob < 1: none drawn
        return mixed, lam_t * targets + (1.0 - lam_t) * targets.flip(0)

    def _per_sample(self, values: np.ndarray, batch: int) -> np.ndarray:
        if self.mode == "batch":
            return np.repeat(values, batch)
        if self.mode == "pair":
            return np.concatenate([values, values[::-1]])
        return values

    def _mix(self, images: torch.Tensor, draw: MixDraw, params: torch.Tensor) -> torch.Tensor:
        if self.mode == "batch" and draw.cutmix[0]:  # one box for all: one slice copy from the reversed batch
            y0, y1, x0, x1 = draw.boxes[0].tolist()
            out = images.clone()
            out[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].flip(0)
            return out
        # A fixed number of ops whatever the batch size: the per-sample boxes become one mask (no loop over samples).
        source = images.flip(0)
        w = params[:, 1].to(images.dtype).view(-1, 1, 1, 1)
        out = images * w + source * (1.0 - w)
        if not draw.cutmix.any():
            return out
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = params[:, 2:, None].unbind(1)  # (N, 1) each; an empty box (0, 0, 0, 0) where no cutmix
        rows = torch.arange(height, device=images.device, dtype=params.dtype)
        cols = torch.arange(width, device=images.device, dtype=params.dtype)
        inside = ((rows >= y0) & (rows < y1))[:, :, None] & ((cols >= x0) & (cols < x1))[:, None, :]
        return torch.where(inside[:, None], source, out)

    def _per_sample_boxes(self, boxes: np.ndarray, batch: int) -> np.ndarray:
        if self.mode == "batch":
            return np.repeat(boxes, batch, axis=0)
        if self.mode == "pair":
            return np.concatenate([boxes, boxes[::-1]])
        return boxes


def _cutmix_box(lam: float, centre: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float]:
    """timm's rand_bbox around ``centre`` for ``lam``, clipped to the image, and lambda corrected to its area."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = centre
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    area = (y1 - y0) * (x1 - x0)
    return np.array([y0, y1, x0, x1]), 1.0 - area / float(height * width)
