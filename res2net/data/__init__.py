"""Data pipelines: ``build_loader(cfg, split, *, rank, world_size, seed, device, channels_last, dtype)`` returns
the Loader of one rank (the protocol: loader_base.EpochLoader) from one of three backends chosen by
``data.backend``: dali, torchvision (PIL in DataLoader workers) or synthetic.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch

from .augment import parse_policy
from .config import DataConfig
from .index import class_folders, scan_split
from .loader_base import is_read_error
from .transforms import Normalizer, val_resize_size

__all__ = ["DataConfig", "build_loader", "scan_split", "as_data_config", "loader_from_samples", "is_read_error"]

SPLITS = ("train", "val")


def as_data_config(cfg: Any) -> DataConfig:
    """DataConfig from a DataConfig, an OmegaConf node or a mapping; unknown keys are an error."""
    if isinstance(cfg, DataConfig):
        return cfg
    if hasattr(cfg, "_metadata"):  # an OmegaConf node; imported lazily so the library does not need it
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(known)}")
    return DataConfig(**cfg)


def _validate(cfg: DataConfig, split: str) -> None:
    def bad(key: str, value, expected: str) -> ValueError:
        return ValueError(f"data.{key}={value!r} is invalid: expected {expected}")

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
    for key in ("batch_size", "img_size", "prefetch"):
        if int(getattr(cfg, key)) < 1:
            raise bad(key, getattr(cfg, key), "an integer >= 1")
    if cfg.num_workers < 0:
        raise bad("num_workers", cfg.num_workers, "an integer >= 0")
    scale, ratio = list(cfg.train_crop_scale), list(cfg.train_crop_ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise bad("train_crop_scale", scale, "[min, max] with 0 < min <= max <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise bad("train_crop_ratio", ratio, "[min, max] with 0 < min <= max")
    if not 0.0 <= cfg.hflip <= 1.0:
        raise bad("hflip", cfg.hflip, "a probability in [0, 1]")
    val_resize_size(cfg.img_size, cfg.crop_pct)
    _validate_augmentation(cfg, bad)


def _validate_augmentation(cfg: DataConfig, bad) -> None:
    parse_policy(cfg.auto_augment)
    if not 0.0 <= cfg.random_erasing <= 1.0:
        raise bad("random_erasing", cfg.random_erasing, "a probability in [0, 1]")
    if cfg.color_jitter < 0:
        raise bad("color_jitter", cfg.color_jitter, "a strength >= 0 (0 = off)")
    if int(cfg.repeated_aug) < 1:
        raise bad("repeated_aug", cfg.repeated_aug, "an integer >= 1 (1 = off)")
    if cfg.val_img_size is not None and int(cfg.val_img_size) < 1:
        raise bad("val_img_size", cfg.val_img_size, "null (= data.img_size) or an integer >= 1")
    sizes, epochs = cfg.progressive_sizes, cfg.progressive_epochs
    if (sizes is None) != (epochs is None):
        raise bad("progressive_sizes", sizes, f"set together with data.progressive_epochs (now {epochs}), or both null")
    if cfg.progressive_step < 1:
        raise bad("progressive_step", cfg.progressive_step, "an integer >= 1")
    if sizes is not None:
        if len(sizes) != 2 or min(sizes) < 1 or any(s % cfg.progressive_step for s in sizes):
            raise bad("progressive_sizes", sizes, f"[start, end] sizes, multiples of {cfg.progressive_step}")
        if len(epochs) != 2 or not 0 <= epochs[0] < epochs[1]:
            raise bad("progressive_epochs", epochs, "[start, end] epochs with 0 <= start < end")


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
    dtype: torch.dtype = torch.float32,
):
    """The Loader for ``split`` ('train' | 'val') of this rank; loader_base.EpochLoader states the protocol."""
    cfg = as_data_config(cfg)
    _validate(cfg, split)
    device = torch.device(device)
    train = split == "train"
    common = dict(rank=rank, world_size=world_size, seed=seed, device=device)
    if cfg.backend == "synthetic":
        from .loader_synthetic import SyntheticLoader

        return SyntheticLoader(cfg, train, channels_last=channels_last, dtype=dtype, **common)
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
