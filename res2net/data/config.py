"""Data configuration shared by every backend.

Plain dataclasses and typing only (no Hydra import), so the engine's structured config can nest it. Sequences are
lists, not tuples, because OmegaConf stores lists.
"""

from dataclasses import dataclass, field

__all__ = ["DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "BACKENDS", "INTERPOLATIONS", "DALI_DECODERS", "DALI_RESIZES"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BACKENDS = ("dali", "torchvision", "synthetic")
INTERPOLATIONS = ("bilinear", "bicubic")
DALI_DECODERS = ("auto", "cpu", "mixed")
DALI_RESIZES = ("auto", "graph", "torch")


@dataclass
class DataConfig:
    # <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; unused by the synthetic backend.
    root: str | None = None
    backend: str = "dali"
    # Per process. Train drops the last partial batch; val keeps it.
    batch_size: int = 64
    # torchvision: DataLoader worker processes (0 = decode in the main process). dali: CPU threads of the pipeline.
    num_workers: int = 4
    img_size: int = 224
    # Val resizes the shorter side to floor(img_size / crop_pct), then center-crops img_size. Must be in (0, 1].
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    train_crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Batches each torchvision worker prepares ahead / DALI pipeline prefetch depth.
    prefetch: int = 2
    # DALI decoding placement: auto = 'mixed' when the loader's device is CUDA, 'cpu' otherwise.
    dali_decoder: str = "auto"
    # DALI resize / flip / normalize placement: auto = 'torch' with CPU decoding, 'graph' with 'mixed' decoding;
    # 'graph' = the whole pipeline in DALI, the graph the GPU runs (also with CPU decoding: how the CPU tests
    # exercise the GPU path); 'torch' = DALI decodes, torch resizes (faster on the CPU; CPU decoding only).
    dali_resize: str = "auto"
    synthetic_num_classes: int = 1000
    synthetic_train_size: int = 1281167
    synthetic_val_size: int = 50000
