"""Variant registry: ``create_model(name, ...)`` and ``list_models()``."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .features import FEATURE_INDICES, FeatureListNet
from .hub import released_weights
from .pretrained import load_pretrained

__all__ = ["OVERRIDES", "create_model", "list_models", "register_model"]

# The ablation knobs a variant's arguments may be overridden with (the Res2Net constructor's arguments).
OVERRIDES = (
    "layers",
    "base_width",
    "scale",
    "cardinality",
    "stem",
    "avg_down",
    "num_classes",
    "in_chans",
    "drop_rate",
    "zero_init_last",
    "output_stride",
)

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: tuple[int, ...] = FEATURE_INDICES,
    **overrides,
) -> nn.Module:
    """Build a variant by name.

    ``overrides`` replace the variant's arguments (see ``OVERRIDES``); a value of None keeps the variant's own
    value, so a config may leave a knob at null. ``pretrained=True`` loads the released ImageNet weights
    (downloaded into the cache on first use, see ``res2net.models.pretrained``). ``features_only=True`` returns the
    backbone: a ``FeatureListNet`` giving the feature maps at ``out_indices`` (see ``res2net.models.features``).
    Raises ValueError for an unknown name, an unknown override or a bad value.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid overrides: {', '.join(OVERRIDES)}")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    model = _MODELS[name](num_classes=1000 if features_only else num_classes, **overrides)
    if pretrained:
        load_pretrained(model, released_weights(name))  # the file locations, then the Hugging Face hub
    return FeatureListNet(model, out_indices) if features_only else model
