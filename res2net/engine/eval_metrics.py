"""What the evaluation loop (res2net.engine.eval_loop.evaluate) counts: top-1/top-5 and per-class hits, negative
log-likelihood, calibration bins, ReaL hits, and the class mask of the 200-class sets.

Every sum is a tensor on the model's device during the loop (no host synchronisation per batch) and is summed over
ranks once at the end: integer counts exactly, so top-1/top-5, per-class, ReaL and bin counts are the same for any
world size; the NLL and confidence sums in float64.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from res2net.engine.distributed import all_reduce_sum

__all__ = [
    "ECE_BINS",
    "EvalTally",
    "class_mask",
    "expected_calibration_error",
    "real_label_rows",
    "read_real_labels",
    "restrict",
]

ECE_BINS = 15  # equal-width bins over the max softmax probability (Guo et al. 2017)
TOPK = (1, 5)
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")


def class_mask(num_classes: int, subset: Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (num_classes,) mask of the classes predictions may take; None when all may."""
    if subset is None:
        return None
    bad = [c for c in subset if not 0 <= c < num_classes]
    if bad or not subset:
        raise ValueError(
            f"class subset {list(subset)[:5]} must be a non-empty list of class indices in "
            f"[0, {num_classes}); out of range: {bad[:5]}"
        )
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    mask[list(subset)] = True
    return mask


def restrict(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with the classes outside ``mask`` at -inf: their softmax is 0 and they are never the arg-max."""
    return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def expected_calibration_error(counts: Sequence[int], correct: Sequence[int], confidence: Sequence[float]) -> float:
    """ECE = sum over bins of (count / N) * |accuracy - mean confidence| from per-bin image counts, top-1 hits and
    summed confidences."""
    total = sum(counts)
    return sum(abs(k - c) for n, k, c in zip(counts, correct, confidence) if n) / total


def read_real_labels(path: str | Path) -> list[list[int]]:
    """ReaL's real.json: one list of class indices per ImageNet val image, in file-name order (50,000 lists)."""
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"real_labels={path}: cannot read it as JSON ({err}); download real.json from "
            f"https://github.com/google-research/reassessed-imagenet"
        ) from err
    if not isinstance(labels, list) or not all(
        isinstance(row, list) and all(isinstance(c, int) for c in row) for row in labels
    ):
        raise ValueError(
            f"real_labels={path}: expected a JSON list of lists of class indices (one per val image, "
            f"in ILSVRC2012_val_00000001 ... order)"
        )
    return labels


def real_label_rows(
    real: Sequence[Sequence[int]], paths: Sequence[str], num_classes: int, source: str = "real_labels"
) -> torch.Tensor:
    """(len(paths), L) int64: the ReaL classes of each image (by its ILSVRC2012_val_<n> file name), -1 padded."""
    rows = []
    for path in paths:
        match = _VAL_NAME.match(os.path.basename(path))
        if match is None:
            raise ValueError(
                f"{source}: {path} is not an ImageNet val file (ILSVRC2012_val_<8 digits>.JPEG); ReaL "
                f"labels apply to ImageNet val only (scripts/prepare_imagenet.py keeps these names)"
            )
        index = int(match.group(1)) - 1
        if not 0 <= index < len(real):
            raise ValueError(f"{source} has {len(real)} lists, none for {path} (image {index + 1})")
        row = list(real[index])
        if any(not 0 <= c < num_classes for c in row):
            raise ValueError(f"{source}: the list of {path} ({row}) has classes outside [0, {num_classes})")
        rows.append(row)
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), width)


class EvalTally:
    """Sums over this rank's images: top-1/top-5 hits, per-class hits and counts, NLL, ``ECE_BINS`` calibration bins
    (count, top-1 hits, confidence) and, with ``real_rows`` (``real_label_rows`` of this rank's images in iteration
    order), ReaL top-1/top-5 hits and the number of images with a non-empty ReaL list."""

    def __init__(
        self, num_classes: int, device: torch.device, real_rows: torch.Tensor | None = None, bins: int = ECE_BINS
    ):
        self.num_classes, self.bins = num_classes, bins
        self.real = None if real_rows is None else real_rows.to(device)
        # [top-1, top-5, real top-1, real top-5, real count, images] + per-class hits + per-class counts + bin counts
        # + bin hits, as one int64 vector; [NLL, confidence per bin] as one float64 vector.
        self.counts = torch.zeros(6 + 2 * num_classes + 2 * bins, dtype=torch.int64, device=device)
        self.sums = torch.zeros(1 + bins, dtype=torch.float64, device=device)
        self.edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=device)[1:-1]
        self.seen = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: (N, C) log-probabilities of the scored distribution, (N,) targets."""
        if log_probs.ndim != 2 or targets.ndim != 1 or log_probs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"evaluate expects scores (N, C) and targets (N,), got {tuple(log_probs.shape)} and "
                f"{tuple(targets.shape)}"
            )
        n, c, b = targets.shape[0], self.num_classes, self.bins
        top = log_probs.topk(min(max(TOPK), log_probs.shape[1]), dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        hit1 = hits[:, 0]
        ones = torch.ones_like(targets)
        self.counts[0] += hit1.sum()
        self.counts[1] += hits.any(dim=1).sum()
        if self.real is not None:
            real = self.real[self.seen : self.seen + n]
            in_real = real.unsqueeze(2).eq(top.unsqueeze(1))  # (N, L, k); -1 padding matches nothing
            self.counts[2] += in_real[:, :, 0].any(dim=1).sum()
            self.counts[3] += in_real.any(dim=2).any(dim=1).sum()
            self.counts[4] += real.ge(0).any(dim=1).sum()
        self.counts[5] += n
        self.counts[6 : 6 + c].index_add_(0, targets, hit1.long())
        self.counts[6 + c : 6 + 2 * c].index_add_(0, targets, ones)
        confidence = log_probs.max(dim=1).values.double().exp()
        # bin i holds confidences in (i / bins, (i + 1) / bins]
        bin_of = torch.bucketize(confidence, self.edges)
        self.counts[6 + 2 * c : 6 + 2 * c + b].index_add_(0, bin_of, ones)
        self.counts[6 + 2 * c + b :].index_add_(0, bin_of, hit1.long())
        self.sums[0] -= log_probs.gather(1, targets.unsqueeze(1)).double().sum()
        self.sums[1:].index_add_(0, bin_of, confidence)
        self.seen += n

    def result(self, reduce_device: torch.device) -> dict:
        """The metrics over all ranks (one all-reduce per dtype): top1, top5, loss and nll (mean NLL), ece, count,
        per_class_correct, per_class_count, and with ReaL rows real_top1, real_top5, real_count."""
        if self.real is not None and self.seen != self.real.shape[0]:
            raise RuntimeError(
                f"evaluate() saw {self.seen} images on this rank but had ReaL rows for "
                f"{self.real.shape[0]}: the loader's paths and its batches disagree"
            )
        counts = all_reduce_sum(self.counts.to(reduce_device)).cpu().tolist()
        sums = all_reduce_sum(self.sums.to(reduce_device)).cpu().tolist()
        c, b = self.num_classes, self.bins
        count = counts[5]
        if count == 0:
            raise RuntimeError("evaluate() saw no images: the validation loader is empty on every rank")
        nll = sums[0] / count
        out = {
            "loss": nll,
            "nll": nll,
            "top1": 100.0 * counts[0] / count,
            "top5": 100.0 * counts[1] / count,
            "count": count,
            "per_class_correct": counts[6 : 6 + c],
            "per_class_count": counts[6 + c : 6 + 2 * c],
            "ece": expected_calibration_error(counts[6 + 2 * c : 6 + 2 * c + b], counts[6 + 2 * c + b :], sums[1:]),
        }
        if self.real is not None:
            real_count = counts[4]
            out.update(
                real_count=real_count,
                real_top1=100.0 * counts[2] / real_count if real_count else None,
                real_top5=100.0 * counts[3] / real_count if real_count else None,
            )
        return out
