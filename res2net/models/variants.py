"""The Res2Net variants, one entry each: architecture arguments, released weights, published accuracy and cost.

Every other place (the registry, the downloader, the statistics, scripts/eval_released.py, configs/model/) reads
its per-variant facts from ``VARIANTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TOLERANCE", "LOCATIONS", "MODEL_KNOBS", "RELEASED", "VARIANTS", "Variant"]

# The architecture knobs every entry states (the Res2Net arguments a config or an override may change), in the
# order error messages list them. num_classes is not one: it belongs to the data, not the variant.
MODEL_KNOBS = (
    "layers",
    "base_width",
    "scale",
    "cardinality",
    "stem",
    "avg_down",
    "zero_init_last",
    "drop_rate",
    "drop_path_rate",
)

# The two public locations serving the same released files (timm's GitHub release and the authors' bucket).
LOCATIONS = (
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-res2net",
    "https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net",
)
DEFAULT_TOLERANCE = 0.1  # allowed |measured - published| top-1 / top-5, in points

_R50 = (3, 4, 6, 3)
_R101 = (3, 4, 23, 3)


@dataclass(frozen=True)
class Variant:
    """One variant. Published accuracy is ImageNet-1k val top-1 / top-5 (%) at 224 px, crop 0.875, bilinear."""

    name: str
    layers: tuple[int, ...]
    base_width: int
    scale: int
    cardinality: int = 1
    stem: str = ""  # "" (7x7 conv) | "deep" (three 3x3 convs)
    avg_down: bool = False  # 2x2 average pool before the shortcut's 1x1 conv
    # False for every variant: train.py follows the authors' recipe, whose code does not zero-init the last BN
    # of a block (timm's does); create_model(name) builds what train.py trains.
    zero_init_last: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth: a training-recipe knob, 0 for every variant
    file: str | None = None  # released checkpoint at each of LOCATIONS, "<stem>-<sha256 prefix>.pth"
    top1: float | None = None
    top5: float | None = None
    params: int | None = None  # exact parameter count of the model card
    gmacs: float | None = None  # at 224 px, timm's convention (see res2net.models.stats)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def hub_id(self) -> str:
        """timm's copy of the weights on the Hugging Face hub (safetensors)."""
        return f"timm/{self.name}.in1k"

    @property
    def urls(self) -> tuple[str, ...]:
        """The released file at each public location, in the order tried; empty when there is no released file."""
        return tuple(f"{base}/{self.file}" for base in LOCATIONS) if self.file else ()

    def arch(self) -> dict:
        """The knobs' values (``MODEL_KNOBS``), as Res2Net keyword arguments."""
        return {knob: getattr(self, knob) for knob in MODEL_KNOBS}


# Published accuracy: timm's results-imagenet.csv (latest table), measured with our evaluator's preprocessing.
# res2net50_26w_8s: the model card says 79.19 / 94.37 and older timm tables 79.20, but timm's latest table
# re-measured 78.950 / 94.280; we use that (one source for every row) with a wider tolerance for the move.
# res2net50d / res2net101d have no file at the public locations: their weights exist only on the hub (hub_id).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "res2net50_26w_4s",
            _R50,
            26,
            4,
            file="res2net50_26w_4s-06e79181.pth",
            top1=77.994,
            top5=93.860,
            params=25_699_120,
            gmacs=4.28,
        ),
        Variant(
            "res2net50_26w_6s",
            _R50,
            26,
            6,
            file="res2net50_26w_6s-19041792.pth",
            top1=78.586,
            top5=94.120,
            params=37_051_448,
            gmacs=6.33,
        ),
        Variant(
            "res2net50_26w_8s",
            _R50,
            26,
            8,
            file="res2net50_26w_8s-2c7c9f12.pth",
            top1=78.950,
            top5=94.280,
            params=48_403_776,
            gmacs=8.37,
            tolerance=0.3,
        ),
        Variant(
            "res2net50_48w_2s",
            _R50,
            48,
            2,
            file="res2net50_48w_2s-afed724a.pth",
            top1=77.528,
            top5=93.562,
            params=25_287_304,
            gmacs=4.18,
        ),
        Variant(
            "res2net50_14w_8s",
            _R50,
            14,
            8,
            file="res2net50_14w_8s-6527dddc.pth",
            top1=78.142,
            top5=93.852,
            params=25_059_816,
            gmacs=4.21,
        ),
        Variant(
            "res2net101_26w_4s",
            _R101,
            26,
            4,
            file="res2net101_26w_4s-02a759a1.pth",
            top1=79.192,
            top5=94.466,
            params=45_206_688,
            gmacs=8.10,
        ),
        Variant(
            "res2next50",
            _R50,
            4,
            4,
            cardinality=8,
            file="res2next50_4s-6ef7e7bf.pth",
            top1=78.238,
            top5=93.904,
            gmacs=4.20,
        ),
        Variant("res2net50d", _R50, 26, 4, stem="deep", avg_down=True, top1=80.280, gmacs=4.52),
        Variant("res2net101d", _R101, 26, 4, stem="deep", avg_down=True, top1=81.236, gmacs=8.35),
    )
}

# The variants with a released file at the public locations (what pretrained=True and `make eval` can fetch).
RELEASED: dict[str, Variant] = {name: v for name, v in VARIANTS.items() if v.file}
