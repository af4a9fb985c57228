"""Count-exact evaluation loop, shared by evaluate.py and the trainer's per-epoch validation.

Every rank runs its own shard of the validation set (shards differ by at most one image and may yield a different
number of batches), so no collective runs inside the loop. Afterwards the integer correct counts, the per-class counts
and the summed loss are all-reduced and divided by the global image count: the result is the same for any world size,
unlike averaging per-rank percentages over padded shards.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from res2net.engine.distributed import all_reduce_sum

__all__ = ["evaluate", "topk_correct", "AMP_MODES", "autocast"]

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREDICTION_TOPK = 5


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k.

    k larger than the number of classes counts every sample as correct (as timm's `accuracy` does).
    """
    return [int(n) for n in _topk_hits(logits, targets, ks).tolist()]


def _topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    # Stays on the logits' device: no host synchronisation per batch.
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"topk_correct expects logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    maxk = min(max(ks), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(targets.unsqueeze(1))
    return torch.stack([hits[:, :min(k, maxk)].sum() for k in ks])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def autocast(device: torch.device, amp: str):
    """The autocast context for amp = off | bf16 | fp16 (a no-op context for off)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not one of {sorted(AMP_MODES)}")
    if AMP_MODES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_MODES[amp])


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # DDP's forward may broadcast buffers, a collective; ranks with uneven shard lengths would then hang.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _num_classes(model: nn.Module, loader: Any) -> int:
    n = getattr(loader, "num_classes", None) or getattr(model, "num_classes", None)
    if not n:
        raise ValueError("evaluate() needs the number of classes: give the loader or the model a num_classes "
                         "attribute")
    return int(n)


def _reduce_device(device: torch.device) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def _prediction_rows(paths: list[str], targets: torch.Tensor, probs: torch.Tensor) -> list[dict]:
    top = probs.topk(min(PREDICTION_TOPK, probs.shape[1]), dim=1)
    return [{"path": p, "target": int(t), "top5": i.tolist(), "top5_prob": v.tolist()}
            for p, t, i, v in zip(paths, targets.tolist(), top.indices.cpu(), top.values.cpu())]


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


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, *, device: torch.device | str, amp: str = "off",
             channels_last: bool = False, collect_predictions: bool = False, progress: bool = False) -> dict:
    """Loss, top-1/top-5 (percent) and per-class counts over the whole validation set, exact for any world size.

    `loader` follows the data loader protocol: iterating yields (images, labels) of this rank's shard, every image of
    the set exactly once over all ranks; `loader.paths` (when present) names this rank's images in iteration order.
    Returns loss, top1, top5, count, per_class_correct, per_class_count, seconds and img_per_s (global images over
    this rank's wall time); with `collect_predictions`, 'predictions' on rank 0 (None elsewhere): one dict per image
    (path, target, top5, top5_prob) in global sample order. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    net = _unwrap_ddp(model)
    num_classes = _num_classes(net, loader)
    paths = getattr(loader, "paths", None)
    paths = [] if paths is None else list(paths)
    was_training = net.training
    net.eval()

    # Accumulated on the device, moved to the host once: [top-1 hits, top-5 hits, per-class hits, per-class count].
    stats = torch.zeros(2 + 2 * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    class_ids = torch.arange(num_classes, device=device)
    rows: list[dict] = []
    seen = 0
    start = time.perf_counter()
    try:
        for images, targets in _batches(loader, progress):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = net(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            stats[:2] += _topk_hits(logits, targets, (1, 5))
            in_class = targets.unsqueeze(1).eq(class_ids)  # (N, C); boolean masks avoid a sync-inducing index
            hit = logits.argmax(dim=1).eq(targets)
            stats[2:2 + num_classes] += (in_class & hit.unsqueeze(1)).sum(dim=0)
            stats[2 + num_classes:] += in_class.sum(dim=0)
            if collect_predictions:
                n = targets.shape[0]
                names = paths[seen:seen + n] if paths else [f"#{seen + j}" for j in range(n)]
                rows += _prediction_rows(names, targets.cpu(), logits.softmax(dim=1).cpu())
            seen += targets.shape[0]
    finally:
        net.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    reduce_dev = _reduce_device(device)
    counts = all_reduce_sum(torch.cat([stats.to(reduce_dev), torch.tensor([seen], device=reduce_dev)])).cpu()
    loss_total = float(all_reduce_sum(loss_sum.to(reduce_dev)).cpu())
    count = int(counts[-1])
    if count == 0:
        raise RuntimeError("evaluate() saw no images: the validation loader is empty on every rank")
    result = {
        "loss": loss_total / count,
        "top1": 100.0 * int(counts[0]) / count,
        "top5": 100.0 * int(counts[1]) / count,
        "count": count,
        "per_class_correct": counts[2:2 + num_classes].tolist(),
        "per_class_count": counts[2 + num_classes:-1].tolist(),
        "seconds": seconds,
        "img_per_s": count / seconds if seconds > 0 else float("nan"),
    }
    if collect_predictions:
        result["predictions"] = _gather_predictions(rows)
    return result
