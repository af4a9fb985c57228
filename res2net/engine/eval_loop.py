"""The count-exact evaluation loop, shared by evaluate.py (``res2net.engine.eval_job``) and the per-epoch validation
of training.

Every rank runs its own shard of the validation set (shards differ by at most one image and may yield a different
number of batches), so no collective runs inside the loop. Afterwards the integer counts
(res2net.engine.eval_metrics) and the summed NLL are all-reduced and divided by the global image count: the result is
the same for any world size, unlike averaging per-rank percentages over padded shards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from res2net.config import Tta
from res2net.engine.amp import autocast
from res2net.engine.eval_metrics import EvalTally, class_mask, restrict

__all__ = ["PREDICTION_TOPK", "evaluate"]

PREDICTION_TOPK = 5


def _without_ddp(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, whose forward may broadcast buffers: with uneven shards ranks
    would wait in that collective. A torch.compile wrapper stays, so a compiled model runs compiled."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _num_classes(model: nn.Module, loader: Any) -> int:
    n = getattr(loader, "num_classes", None) or getattr(model, "num_classes", None)
    if not n:
        raise ValueError("evaluate() needs the number of classes: give the loader or the model a num_classes attribute")
    return int(n)


def _reduce_device(device: torch.device) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def _prediction_rows(paths: list[str], targets: torch.Tensor, probs: torch.Tensor) -> list[dict]:
    top = probs.topk(min(PREDICTION_TOPK, probs.shape[1]), dim=1)
    return [
        {"path": p, "target": int(t), "top5": i.tolist(), "top5_prob": v.tolist()}
        for p, t, i, v in zip(paths, targets.tolist(), top.indices.cpu(), top.values.cpu())
    ]


def _gather_predictions(rows: list[dict]) -> list[dict] | None:
    """All ranks' prediction rows on rank 0, in global sample order; None on the other ranks.

    Val shards are contiguous blocks of the sorted sample list in rank order (res2net.data.index.val_shard), so
    concatenating the ranks' rows in rank order gives the global order for any world size.
    """
    rank, world = _world()
    if world == 1:
        return rows
    gathered: list[list[dict]] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(rows, gathered, dst=0)
    if rank != 0:
        return None
    return [r for part in gathered for r in part]


def _batches(loader: Iterable, progress: bool):
    if not progress or _world()[0] != 0:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)


def _log_probs(
    net: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    amp: str,
    channels_last: bool,
    tta: str,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(N, C) log-probabilities of the scored distribution: softmax over the allowed classes, averaged over the image
    and its mirror with tta='flip'."""
    views = [images, images.flip(3)] if tta == "flip" else [images]
    out = []
    for view in views:
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = net(view)
        out.append(restrict(logits.float(), mask).log_softmax(dim=1))
    return out[0] if len(out) == 1 else torch.stack(out).logsumexp(dim=0) - math.log(len(out))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device | str,
    amp: str = "off",
    channels_last: bool = False,
    collect_predictions: bool = False,
    progress: bool = False,
    tta: str = "none",
    class_subset: Sequence[int] | None = None,
    real_labels: torch.Tensor | None = None,
) -> dict:
    """Loss, top-1/top-5 (percent), calibration and per-class counts over the whole validation set, exact for any
    world size.

    `loader` follows the data loader protocol: iterating yields (images, labels) of this rank's shard, every image of
    the set exactly once over all ranks; `loader.paths` (when present) names this rank's images in iteration order.
    Scores are the softmax of the logits; `tta='flip'` averages it over the image and its mirror; `class_subset`
    restricts it to those class indices (ImageNet-R / -A: the arg-max over their logits). `real_labels`
    (``eval_metrics.real_label_rows`` of this rank's images, in iteration order) adds ReaL top-1/top-5.
    Returns loss and nll (both the mean negative log-likelihood), top1, top5, ece (``eval_metrics.ECE_BINS`` bins),
    count, per_class_correct, per_class_count, [real_top1, real_top5, real_count,] seconds and img_per_s (global
    images over this rank's wall time); with `collect_predictions`, 'predictions' on rank 0 (None elsewhere): one dict
    per image (path, target, top5, top5_prob) in global sample order. The model's train/eval mode is restored.
    """
    tta = Tta.of(tta, "tta")
    device = torch.device(device)
    if device.type == "cuda":  # validation reads results on the host: RES2NET_SYNC_DEBUG watches training steps only
        torch.cuda.set_sync_debug_mode(0)
    net = _without_ddp(model)
    num_classes = _num_classes(_plain(net), loader)
    mask = class_mask(num_classes, class_subset, device)
    paths = getattr(loader, "paths", None)
    paths = [] if paths is None else list(paths)
    was_training = net.training
    net.eval()

    tally = EvalTally(num_classes, device, real_labels)
    rows: list[dict] = []
    start = time.perf_counter()
    try:
        for images, targets in _batches(loader, progress):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            log_probs = _log_probs(net, images, device=device, amp=amp, channels_last=channels_last, tta=tta, mask=mask)
            if collect_predictions:
                n, seen = targets.shape[0], tally.seen
                names = paths[seen : seen + n] if paths else [f"#{seen + j}" for j in range(n)]
                rows += _prediction_rows(names, targets.cpu(), log_probs.exp().cpu())
            tally.add(log_probs, targets)
    finally:
        net.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    result = tally.result(_reduce_device(device))
    result.update(seconds=seconds, img_per_s=result["count"] / seconds if seconds > 0 else float("nan"))
    if collect_predictions:
        result["predictions"] = _gather_predictions(rows)
    return result
