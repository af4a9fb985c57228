"""Evaluation sets beyond ImageNet val, read as distributed: ImageNetV2, ImageNet-Sketch, ImageNet-R, ImageNet-A.

``data.root`` is the folder the archives were extracted into; each set has its own folder there (``EVAL_SETS``).
Labels are ImageNet-1k class indices (positions in the sorted 1,000 wnids, ``IMAGENET1K_WNIDS``, the classes of the
released checkpoints), never the set's own folder order: V2's class folders are named by class index already, the
others by wnid. ImageNet-R and -A hold 200 of the 1,000 classes and are scored over the classes present
(``scored_classes``), as their authors evaluate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .imagenet_wnids import IMAGENET1K_WNIDS
from .index import scan_split

__all__ = ["EVAL_SETS", "EvalSet", "eval_set", "eval_set_loader", "scan_eval_set", "scored_classes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    name: str
    folders: dict[str, str]  # variant ('' for a set without variants) -> its folder under data.root
    by_index: bool  # class folders named 0 ... 999 (V2) rather than by wnid
    num_classes: int  # class folders of the whole set
    subset: bool  # scored over the classes present only (arg-max over their logits)
    source: str  # where to download it

    def folder(self, root: str | None, variant: str) -> str:
        """The set's folder under ``root``; a missing one is an error saying what to extract where."""
        if variant not in self.folders:
            allowed = " | ".join(repr(v) for v in self.folders)
            raise ValueError(f"testset_variant={variant!r} is not a variant of {self.name}; use {allowed}")
        if root is None:
            raise ValueError(
                f"data.root is not set; pass data.root=<folder holding {self.folders[variant]}/> "
                f"for {self.name} (download: {self.source})"
            )
        path = os.path.join(root, self.folders[variant])
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{self.name}: {path!r} does not exist; extract the set's archive into "
                f"data.root={root} so that it holds {self.folders[variant]}/<class>/* "
                f"(download: {self.source})"
            )
        return path


_V2_VARIANTS = {
    "matched-frequency": "imagenetv2-matched-frequency-format-val",
    "threshold-0.7": "imagenetv2-threshold0.7-format-val",
    "top-images": "imagenetv2-top-images-format-val",
}

EVAL_SETS: dict[str, EvalSet] = {
    "imagenet_v2": EvalSet(
        "imagenet_v2", _V2_VARIANTS, True, 1000, False, "https://huggingface.co/datasets/vaishaal/ImageNetV2"
    ),
    "imagenet_sketch": EvalSet(
        "imagenet_sketch", {"": "sketch"}, False, 1000, False, "https://github.com/HaohanWang/ImageNet-Sketch"
    ),
    "imagenet_r": EvalSet(
        "imagenet_r", {"": "imagenet-r"}, False, 200, True, "https://github.com/hendrycks/imagenet-r"
    ),
    "imagenet_a": EvalSet(
        "imagenet_a", {"": "imagenet-a"}, False, 200, True, "https://github.com/hendrycks/natural-adv-examples"
    ),
}


def eval_set(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ValueError(
            f"testset={name!r} is not an evaluation set; use one of {sorted(EVAL_SETS)} "
            f"(or data=imagenet for ImageNet val)"
        )
    return EVAL_SETS[name]


def _folder_names(s: EvalSet) -> list[str]:
    """The names class folders of ``s`` carry, in class-index order."""
    return [str(i) for i in range(len(IMAGENET1K_WNIDS))] if s.by_index else list(IMAGENET1K_WNIDS)


def scan_eval_set(root: str | None, name: str, variant: str = "") -> list[tuple[str, int]]:
    """[(path, ImageNet-1k class index)] of every image of the set, sorted by class folder then file name."""
    s = eval_set(name)
    folder = s.folder(root, variant)
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    names = _folder_names(s)
    wrong = sorted(set(found) - set(names))
    if wrong:
        kind = "class indices 0 ... 999" if s.by_index else "ImageNet-1k wnids"
        raise ValueError(
            f"{name}: {folder!r} holds class folders that are not {kind}: {wrong[:5]}"
            f"{' ...' if len(wrong) > 5 else ''} ({len(wrong)} of {len(found)}); is data.root the "
            f"folder the {name} archive was extracted into (download: {s.source})?"
        )
    if len(found) != s.num_classes:
        log.warning("%s: %s holds %d class folders; the whole set has %d", name, folder, len(found), s.num_classes)
    samples, _ = scan_split(root, s.folders[variant], names)
    return samples


def scored_classes(name: str, samples: Sequence[tuple[str, int]]) -> list[int] | None:
    """The class indices predictions are restricted to (the classes present, for ImageNet-R / -A); None: all."""
    return sorted({label for _, label in samples}) if eval_set(name).subset else None


def eval_set_loader(
    data_cfg: Any,
    samples: Sequence[tuple[str, int]],
    *,
    rank: int = 0,
    world_size: int = 1,
    device: Any = "cpu",
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """The val Loader (res2net.data protocol, 1,000 classes = ``IMAGENET1K_WNIDS``) over ``scan_eval_set``'s samples
    with ``data_cfg``'s backend and preprocessing."""
    from . import _validate, as_data_config, loader_from_samples

    cfg = as_data_config(data_cfg)
    _validate(cfg, "val")
    if cfg.backend == "synthetic":
        raise ValueError("data.backend=synthetic has no evaluation sets; use data.backend=torchvision or dali")
    return loader_from_samples(
        samples,
        IMAGENET1K_WNIDS,
        cfg,
        False,
        rank=rank,
        world_size=world_size,
        seed=0,
        device=torch.device(device),
        channels_last=channels_last,
        dtype=dtype,
    )
