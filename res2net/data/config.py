"""Data configuration shared by every backend.

Plain dataclasses and typing only (no Hydra import), so the engine's structured config can nest it. Sequences are
lists, not tuples, because OmegaConf stores lists.
"""

import enum
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from res2net.errors import ConfigError

__all__ = [
    "BACKENDS",
    "Backend",
    "Choice",
    "check_data_config",
    "resolve_num_workers",
    "DALI_DECODERS",
    "DALI_RESIZES",
    "DaliDecoder",
    "DaliResize",
    "DataConfig",
    "FORMATS",
    "Format",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "Interpolation",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Choice(str, enum.Enum):
    """A config choice: OmegaConf checks it against the members at composition, and it equals (and prints as) its
    value, so code compares it with plain strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, value: object, key: str) -> "Choice":
        """The member for ``value`` (a member or its text); ValueError naming ``key`` and the allowed values."""
        try:
            return cls(str(value))
        except ValueError:
            allowed = tuple(m.value for m in cls)
            raise ValueError(f"{key}={str(value)!r} is invalid: expected one of {allowed}") from None


class Backend(Choice):
    dali = "dali"
    torchvision = "torchvision"
    synthetic = "synthetic"


class Interpolation(Choice):
    bilinear = "bilinear"
    bicubic = "bicubic"


class Format(Choice):
    folder = "folder"  # data.root's class folders
    wds = "wds"  # WebDataset tar shards (res2net/data/shards.py)


class DaliDecoder(Choice):
    auto = "auto"
    cpu = "cpu"
    mixed = "mixed"


class DaliResize(Choice):
    auto = "auto"
    graph = "graph"
    torch = "torch"


BACKENDS = tuple(m.value for m in Backend)
FORMATS = tuple(m.value for m in Format)
INTERPOLATIONS = tuple(m.value for m in Interpolation)
DALI_DECODERS = tuple(m.value for m in DaliDecoder)
DALI_RESIZES = tuple(m.value for m in DaliResize)


@dataclass
class DataConfig:
    # <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; unused by the synthetic backend.
    root: str | None = None
    backend: Backend = Backend.dali
    # Where the images are: 'folder' = data.root's class folders; 'wds' = WebDataset tar shards (README "Data",
    # res2net/data/shards.py), read by both backends.
    format: Format = Format.folder
    # data.format=wds: the train / val shards: a folder written by scripts/make_shards.py (its manifest.json lists
    # them), a brace pattern such as /data/in1k/train-{0000..1023}.tar, one .tar, or a list of these; local paths.
    # val_shards null with train_shards a make_shards folder: that folder's val shards.
    train_shards: Any = None
    val_shards: Any = None
    # Member extensions of a sample: the image (the first present of these), the class index as ASCII text.
    wds_image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    wds_label_key: str = "cls"
    # Train order inside a shard: true = a (seed, epoch, shard) permutation (one seek per sample within the
    # shard); false = file order (purely sequential reads; the shards' order still changes every epoch).
    wds_shuffle_in_shard: bool = True
    # Per process. Train drops the last partial batch; val keeps it.
    batch_size: int = 64
    # torchvision: DataLoader worker processes (0 = decode in the main process). dali: CPU threads of the pipeline.
    # null: the CPUs this process may use (os.sched_getaffinity) shared among the processes of this machine
    # (LOCAL_WORLD_SIZE under torchrun); a value above this process's CPUs is lowered to them, with a warning.
    num_workers: int | None = None
    img_size: int = 224
    # Val resizes the shorter side to floor(img_size / crop_pct), then center-crops img_size. Must be in (0, 1].
    crop_pct: float = 0.875
    interpolation: Interpolation = Interpolation.bilinear
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    train_crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    # Per-sample augmentation of train images, after the crop and flip (res2net/data/augment.py; README
    # "Augmentation"). Every random choice comes from the crops' counter-based stream, so resume stays exact.
    # auto_augment: null | timm's RandAugment strings 'rand-m9-mstd0.5-inc1' (keys m magnitude, n ops, mstd
    # magnitude noise (inf: uniform), mmax clip, inc 1 = timm's increasing ops, p per-op probability) | 'ta_wide'
    # (torchvision's TrivialAugmentWide) | 'original' (AutoAugment's ImageNet policy, timm's 'original').
    auto_augment: str | None = None
    # RandomErasing probability, timm's per-pixel mode: one box of 2-33% of the area, aspect 0.3-3.3, filled with
    # N(0, 1) noise in normalized space (applied to the normalized batch on the device). 0 = off.
    random_erasing: float = 0.0
    # ColorJitter strength: brightness, contrast and saturation factors in [1 - x, 1 + x], applied in a random
    # order (torchvision's ColorJitter(x, x, x)), after auto_augment. 0 = off.
    color_jitter: float = 0.0
    # Repeated augmentation (timm's RASampler): each epoch takes ceil(N / repeats) images of its permutation, each
    # `repeats` times, interleaved over ranks so the repeats land on different ranks with different draws; an
    # epoch still yields floor(N / world_size) samples per rank. 1 = off (3 in RSB A1/A2, 4 in torchvision's).
    repeated_aug: int = 1
    # Val / eval crop size (null: img_size); val resizes the shorter side to floor(val_img_size / crop_pct).
    val_img_size: int | None = None
    # A folder with only train/: this fraction of each class's images (at least one of a class with two or more)
    # becomes the val split, chosen by a hash of the file's path (deterministic, stratified; res2net/data/split.py);
    # train.py records it in <run dir>/split.json. 0 = the val/ folder.
    val_split: float = 0.0
    # Progressive resizing (FFCV): train at progressive_sizes[0] up to epoch progressive_epochs[0], then ramp
    # linearly to progressive_sizes[1] at epoch progressive_epochs[1], each size rounded to a multiple of
    # progressive_step. null = train at img_size every epoch. Both or neither must be set.
    progressive_sizes: list[int] | None = None
    progressive_epochs: list[int] | None = None
    progressive_step: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Batches each torchvision worker prepares ahead / DALI pipeline prefetch depth.
    prefetch: int = 2
    # DALI decoding placement: auto = 'mixed' when the loader's device is CUDA, 'cpu' otherwise.
    dali_decoder: DaliDecoder = DaliDecoder.auto
    # DALI resize / flip / normalize placement: auto = 'torch' with CPU decoding, 'graph' with 'mixed' decoding;
    # 'graph' = the whole pipeline in DALI, the graph the GPU runs (also with CPU decoding: how the CPU tests
    # exercise the GPU path); 'torch' = DALI decodes, torch resizes (faster on the CPU; CPU decoding only).
    dali_resize: DaliResize = DaliResize.auto
    synthetic_num_classes: int = 1000
    synthetic_train_size: int = 1281167
    synthetic_val_size: int = 50000

    def __post_init__(self) -> None:
        # A DataConfig built from plain strings (a mapping, a notebook) gets the same members as a composed one.
        self.backend = Backend.of(self.backend, "data.backend")
        self.format = Format.of(self.format, "data.format")
        self.interpolation = Interpolation.of(self.interpolation, "data.interpolation")
        self.dali_decoder = DaliDecoder.of(self.dali_decoder, "data.dali_decoder")
        self.dali_resize = DaliResize.of(self.dali_resize, "data.dali_resize")


def _bad(key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"data.{key}={value!r} must be {expected}")


MAX_IMG_SIZE = 4096  # crops beyond this are a typo (one 4096 px fp32 image is 200 MB)


def check_data_config(cfg: DataConfig, *, training: bool = False) -> None:
    """Refuse values the schema's types let through but no loader can use (every backend, train.py and evaluate.py
    alike); the error names the key, the value and what is allowed. ``training``: BatchNorm statistics need two
    samples per process. The augmentation policy's grammar is res2net.data.augment.parse_policy's."""
    from .augment import parse_policy  # torch: not at import, so `train.py --help` stays fast

    parse_policy(cfg.auto_augment)
    least = 2 if training else 1
    if int(cfg.batch_size) < least:
        why = " (BatchNorm computes its statistics over the batch of each process)" if training else ""
        raise _bad("batch_size", cfg.batch_size, f">= {least}{why}")
    for key in ("img_size", "val_img_size"):
        size = getattr(cfg, key)
        if size is not None and not 1 <= int(size) <= MAX_IMG_SIZE:
            raise _bad(key, size, f"in [1, {MAX_IMG_SIZE}] pixels, e.g. 224" + (" (or null)" if "val" in key else ""))
    if int(cfg.prefetch) < 1:
        raise _bad("prefetch", cfg.prefetch, ">= 1")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise _bad("num_workers", cfg.num_workers, ">= 0 (null: a share of this process's CPUs)")
    if not (math.isfinite(cfg.crop_pct) and 0.0 < cfg.crop_pct <= 1.0):
        raise _bad("crop_pct", cfg.crop_pct, "a fraction in (0, 1]")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise _bad("mean", list(cfg.mean), f"three values (R, G, B), as data.std (now {list(cfg.std)})")
    for i, (mean, std) in enumerate(zip(cfg.mean, cfg.std)):
        if not math.isfinite(mean):
            raise _bad(f"mean[{i}]", mean, "a finite number")
        if not (math.isfinite(std) and std > 0):
            raise _bad(f"std[{i}]", std, "a finite number > 0")
    scale, ratio = list(cfg.train_crop_scale), list(cfg.train_crop_ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise _bad("train_crop_scale", scale, "[min, max] with 0 < min <= max <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise _bad("train_crop_ratio", ratio, "[min, max] with 0 < min <= max")
    if not 0.0 <= cfg.hflip <= 1.0:
        raise _bad("hflip", cfg.hflip, "a probability in [0, 1]")
    if not 0.0 <= cfg.random_erasing <= 1.0:
        raise _bad("random_erasing", cfg.random_erasing, "a probability in [0, 1]")
    if cfg.color_jitter < 0:
        raise _bad("color_jitter", cfg.color_jitter, "a strength >= 0 (0 = off)")
    if int(cfg.repeated_aug) < 1:
        raise _bad("repeated_aug", cfg.repeated_aug, "an integer >= 1 (1 = off)")
    if cfg.backend == "synthetic":
        for key in ("synthetic_num_classes", "synthetic_train_size", "synthetic_val_size"):
            if getattr(cfg, key) < 1:
                raise _bad(key, getattr(cfg, key), ">= 1")
    if cfg.format == "wds" and cfg.backend == "synthetic":
        raise _bad("backend", cfg.backend, "'dali' or 'torchvision' with data.format=wds")
    _check_progressive(cfg)


def _check_progressive(cfg: DataConfig) -> None:
    sizes, epochs = cfg.progressive_sizes, cfg.progressive_epochs
    if (sizes is None) != (epochs is None):
        raise _bad("progressive_sizes", sizes, f"both set with data.progressive_epochs (now {epochs}), or both null")
    if cfg.progressive_step < 1:
        raise _bad("progressive_step", cfg.progressive_step, "an integer >= 1")
    if sizes is not None:
        if len(sizes) != 2 or min(sizes) < 1 or any(s % cfg.progressive_step for s in sizes):
            raise _bad("progressive_sizes", sizes, f"[start, end] sizes, multiples of {cfg.progressive_step}")
        if len(epochs) != 2 or not 0 <= epochs[0] < epochs[1]:
            raise _bad("progressive_epochs", epochs, "[start, end] epochs with 0 <= start < end")


_log = logging.getLogger(__name__)
_warned: set[int] = set()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(value: int | None) -> int:
    """``data.num_workers`` as a count: null = this process's share of the CPUs; a count above the CPUs this process
    may use is lowered to them (torch's DataLoader would warn, and the workers would only compete for the cores)."""
    cpus = _cpus()
    if value is None:
        return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if value > cpus:
        if value not in _warned:
            _warned.add(value)
            _log.warning(
                "data.num_workers=%d is more than the %d CPUs this process may use: using %d (null picks a share of "
                "the CPUs)",
                value,
                cpus,
                cpus,
            )
        return cpus
    return value
