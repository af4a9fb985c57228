"""Data pipelines: ``build_loader(cfg, split, *, rank, world_size, seed, device, channels_last, dtype)`` returns
the Loader of one rank (the protocol: loader_base.EpochLoader) from one of three backends chosen by
``data.backend``: dali, torchvision (PIL in DataLoader workers) or synthetic.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import DataConfig, check_data_config, resolve_num_workers
from .index import class_folders, scan_split

if TYPE_CHECKING:
    import torch
# torch, torchvision and the pipelines load on first use: res2net/config.py imports res2net.data.config, and
# `train.py --help` must not wait for them.

__all__ = ["DataConfig", "build_loader", "scan_split", "as_data_config", "loader_from_samples"]

SPLITS = ("train", "val")


def as_data_config(cfg: Any) -> DataConfig:
    """DataConfig from a DataConfig, an OmegaConf node or a mapping; unknown keys are an error."""
    if isinstance(cfg, DataConfig):
        return dataclasses.replace(cfg, num_workers=resolve_num_workers(cfg.num_workers))
    if hasattr(cfg, "_metadata"):  # an OmegaConf node; imported lazily so the library does not need it
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(known)}")
    data = DataConfig(**cfg)
    return dataclasses.replace(data, num_workers=resolve_num_workers(data.num_workers))


def _validate(cfg: DataConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
    check_data_config(cfg)


def _train_classes(root: str | None) -> Sequence[str] | None:
    """The train split's class folders, so val labels use the same mapping even if val lacks a class."""
    train_dir = os.path.join(root, "train") if root else ""
    if not os.path.isdir(train_dir):
        return None
    return class_folders(train_dir) or None


def build_loader(
    cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: Any = "cpu",
    channels_last: bool = False,
    dtype: torch.dtype | None = None,
):
    """The Loader for ``split`` ('train' | 'val') of this rank; loader_base.EpochLoader states the protocol.
    ``dtype``: of the normalized batches, None = float32."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    cfg = as_data_config(cfg)
    _validate(cfg, split)
    device = torch.device(device)
    train = split == "train"
    common = dict(rank=rank, world_size=world_size, seed=seed, device=device)
    if cfg.backend == "synthetic":
        from .loader_synthetic import SyntheticLoader

        return SyntheticLoader(cfg, train, channels_last=channels_last, dtype=dtype, **common)
    if cfg.format == "wds":
        from .loader_wds import build_wds_loader
        from .transforms import Normalizer

        normalizer = Normalizer(cfg.mean, cfg.std, device, dtype, channels_last)
        return build_wds_loader(cfg, split, normalizer=normalizer, **common)
    if cfg.val_split > 0:  # val carved out of train/ (res2net/data/split.py)
        from .split import split_samples

        samples, classes = scan_split(cfg.root, "train")
        samples = split_samples(samples, cfg.val_split, os.path.join(cfg.root, "train"))[0 if train else 1]
    else:
        samples, classes = scan_split(cfg.root, split, None if train else _train_classes(cfg.root))
    return loader_from_samples(samples, classes, cfg, train, channels_last=channels_last, dtype=dtype, **common)


def loader_from_samples(
    samples: Sequence[tuple[str, int]],
    classes: Sequence[str],
    cfg: DataConfig,
    train: bool,
    *,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype,
):
    """The torchvision or DALI Loader over an explicit [(path, label)] list whose labels index ``classes``:
    ``build_loader``'s scan of <root>/<split> is one source, ``res2net.data.testsets`` (evaluation sets) another."""
    from .transforms import Normalizer

    common = dict(rank=rank, world_size=world_size, seed=seed, device=device)
    normalizer = Normalizer(cfg.mean, cfg.std, device, dtype, channels_last)
    if cfg.backend == "torchvision":
        from .loader_torchvision import TorchvisionLoader

        return TorchvisionLoader(samples, classes, cfg, train, normalizer=normalizer, **common)
    try:
        from .loader_dali import DaliLoader
    except ImportError as err:
        raise ImportError(
            f"data.backend=dali needs NVIDIA DALI ({err}); install requirements.txt "
            "(nvidia-dali-cuda130; with a CUDA 12 torch nvidia-dali-cuda120) or use "
            "data.backend=torchvision"
        ) from err
    return DaliLoader(samples, classes, cfg, train, normalizer=normalizer, **common)
