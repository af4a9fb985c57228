"""A checkpoint's evaluation preprocessing: the image size, crop, interpolation, mean and std it expects.

Evaluation, the eval suite, export and prediction take these from the checkpoint instead of from the composed
``data.*`` defaults, so a model trained at 64 px is evaluated, exported and predicted at 64 px without retyping
anything. A value given on the command line still wins (``Preprocessing.overridden`` /
``command_line_fields``). Sources, in order:

- a train.py checkpoint: its stored ``config['data']`` (``val_img_size`` or ``img_size``, ``crop_pct``,
  ``interpolation``, ``mean``, ``std``);
- an exported Hugging Face folder's ``config.json`` (its ``pretrained_cfg``) or a mapping holding a ``preprocessing``
  entry (``Preprocessing.to_dict``, what exports and prediction records write);
- released weights (a bare state_dict): the published evaluation settings of the variant, those of the model card
  (``/work/shared/reference/model-card.md``: 224 px, crop 0.875, bilinear, ImageNet mean and std; the same for every
  variant in ``res2net.models.variants``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from res2net.data.config import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

__all__ = [
    "FIELDS",
    "PUBLISHED",
    "Preprocessing",
    "command_line_fields",
    "preprocessing_of",
    "published_preprocessing",
]

# The fields, in the order records list them.
FIELDS = ("img_size", "crop_pct", "interpolation", "mean", "std")


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize the shorter side to ``resize_size`` with ``interpolation``, center-crop
    ``img_size``, scale to [0, 1], normalize with ``mean`` / ``std`` (per RGB channel)."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_STD)

    def __post_init__(self) -> None:
        # Lists (OmegaConf, JSON) become tuples so the object stays hashable and compares equal across sources.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "img_size", int(self.img_size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "interpolation", str(self.interpolation))  # a config's Interpolation member too
        if self.img_size < 1:
            raise ValueError(f"img_size={self.img_size} is invalid; use a positive number of pixels")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct={self.crop_pct} is invalid; use a fraction in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r} is invalid; use one of {' | '.join(INTERPOLATIONS)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={list(self.mean)} std={list(self.std)}: need three values each, std positive")

    @property
    def resize_size(self) -> int:
        """The shorter side before the center crop: floor(img_size / crop_pct), as the val loaders compute it."""
        return math.floor(self.img_size / self.crop_pct)

    def overridden(self, **values: Any) -> Preprocessing:
        """A copy with the given fields replaced; a value of None keeps this one's (an option left unset)."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown preprocessing field(s) {unknown}; fields: {', '.join(FIELDS)}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def overridden_by(self, data_cfg: Mapping, fields: Iterable[str]) -> Preprocessing:
        """A copy whose ``fields`` take their value from ``data_cfg`` (a DataConfig node or mapping): the fields
        the command line set (``command_line_fields``). img_size reads val_img_size when that is set."""
        values = {}
        for name in fields:
            if name == "img_size":
                values[name] = data_cfg.get("val_img_size") or data_cfg.get("img_size")
            else:
                values[name] = data_cfg.get(name)
        return self.overridden(**values)

    def data_overrides(self) -> dict[str, Any]:
        """The DataConfig values that make a val loader apply this preprocessing (img_size and val_img_size both
        the crop size, crop_pct, interpolation, mean, std), for ``{**data_cfg, **pp.data_overrides()}``."""
        return {
            "img_size": self.img_size,
            "val_img_size": self.img_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / YAML / torch.load(weights_only=True) values (mean and std as lists)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` keys for these values (HF exports' config.json)."""
        return {
            "input_size": [3, self.img_size, self.img_size],
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocessing:
        """The inverse of ``to_dict``; keys other than ``FIELDS`` are ignored, missing ones take the defaults."""
        return cls(**{k: values[k] for k in FIELDS if values.get(k) is not None})

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping) -> Preprocessing:
        """From timm's ``pretrained_cfg`` (input_size [C, H, W] with H == W, crop_pct, interpolation, mean, std)."""
        size = cfg.get("test_input_size") or cfg.get("input_size")
        values = {k: cfg.get(k) for k in ("crop_pct", "interpolation", "mean", "std")}
        if size is not None:
            if len(size) != 3 or size[1] != size[2]:
                raise ValueError(f"pretrained_cfg input_size={list(size)}: only square [C, H, H] inputs are supported")
            values["img_size"] = size[1]
        return cls.from_dict(values)


def published_preprocessing(variant: str | None = None) -> Preprocessing:
    """The evaluation settings the released weights' accuracy was published with (the model card): 224 px, crop
    0.875, bilinear, ImageNet mean and std; every variant in res2net.models.variants shares them."""
    from res2net.models.variants import VARIANTS

    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown model {variant!r}; valid: {', '.join(VARIANTS)}")
    return PUBLISHED


PUBLISHED = Preprocessing()


def preprocessing_of(checkpoint: Mapping, variant: str | None = None) -> Preprocessing:
    """The evaluation preprocessing ``checkpoint`` was made for (see the module docstring for the sources); a
    checkpoint that records none (a released file, a bare state_dict) gets ``variant``'s published settings."""
    recorded = checkpoint.get("preprocessing")
    if isinstance(recorded, Mapping):
        return Preprocessing.from_dict(recorded)
    pretrained_cfg = checkpoint.get("pretrained_cfg")
    if isinstance(pretrained_cfg, Mapping):
        return Preprocessing.from_pretrained_cfg(pretrained_cfg)
    config = checkpoint.get("config")
    data = config.get("data") if isinstance(config, Mapping) else None
    if isinstance(data, Mapping):
        values = {k: data.get(k) for k in ("crop_pct", "interpolation", "mean", "std")}
        values["img_size"] = data.get("val_img_size") or data.get("img_size")
        return Preprocessing.from_dict(values)
    return published_preprocessing(variant)


def command_line_fields(overrides: Iterable[str]) -> frozenset[str]:
    """The preprocessing fields a list of Hydra overrides sets (``HydraConfig.get().overrides.task``, e.g.
    ``data.img_size=64``, ``++data.crop_pct=1.0``): those win over the checkpoint's. ``data.val_img_size`` and
    ``data.img_size`` both set img_size; a group choice (``data=folder``) sets none."""
    fields = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if not key.startswith("data."):
            continue
        name = key[len("data.") :]
        if name == "val_split":  # not preprocessing, but a recipe field too (res2net.engine.recipe)
            fields.add(name)
        if name == "val_img_size":
            name = "img_size"
        if name in FIELDS:
            fields.add(name)
    return frozenset(fields)
