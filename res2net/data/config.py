"""Data configuration shared by every backend.

Plain dataclasses and typing only (no Hydra import), so the engine's structured config can nest it. Sequences are
lists, not tuples, because OmegaConf stores lists.
"""

import enum
from dataclasses import dataclass, field

__all__ = [
    "BACKENDS",
    "Backend",
    "Choice",
    "DALI_DECODERS",
    "DALI_RESIZES",
    "DaliDecoder",
    "DaliResize",
    "DataConfig",
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


class DaliDecoder(Choice):
    auto = "auto"
    cpu = "cpu"
    mixed = "mixed"


class DaliResize(Choice):
    auto = "auto"
    graph = "graph"
    torch = "torch"


BACKENDS = tuple(m.value for m in Backend)
INTERPOLATIONS = tuple(m.value for m in Interpolation)
DALI_DECODERS = tuple(m.value for m in DaliDecoder)
DALI_RESIZES = tuple(m.value for m in DaliResize)


@dataclass
class DataConfig:
    # <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; unused by the synthetic backend.
    root: str | None = None
    backend: Backend = Backend.dali
    # Per process. Train drops the last partial batch; val keeps it.
    batch_size: int = 64
    # torchvision: DataLoader worker processes (0 = decode in the main process). dali: CPU threads of the pipeline.
    num_workers: int = 4
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
        self.interpolation = Interpolation.of(self.interpolation, "data.interpolation")
        self.dali_decoder = DaliDecoder.of(self.dali_decoder, "data.dali_decoder")
        self.dali_resize = DaliResize.of(self.dali_resize, "data.dali_resize")
