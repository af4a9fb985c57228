"""Build a variant by name (``create_model``) or from a model config (``model_from_config``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .features import FEATURE_INDICES, FeatureListNet
from .hub import released_weights
from .pretrained import extract_state_dict, load_weights, read_checkpoint
from .res2net import Res2Net
from .variants import MODEL_KNOBS, VARIANTS, Variant

__all__ = ["CONFIG_KEYS", "create_model", "list_models", "model_from_config", "resolve_model_config"]

# The keys of a model config (res2net.config.ModelConfig); a None value means "the variant's value".
CONFIG_KEYS = ("name", "num_classes", *MODEL_KNOBS)
# Keys of a model config that say where the starting weights come from (res2net.models.loading), not what to build.
INIT_KEYS = ("pretrained", "init_checkpoint")
_IMAGENET_CLASSES = 1000
# create_model also takes in_chans, which no config states (the recipe trains on RGB images).
_OVERRIDES = (*MODEL_KNOBS, "in_chans", "output_stride")


def list_models() -> list[str]:
    """Names of all variants, sorted."""
    return sorted(VARIANTS)


def _variant(name: object) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return VARIANTS[name]


def create_model(
    name: str,
    num_classes: int = _IMAGENET_CLASSES,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] = FEATURE_INDICES,
    **overrides,
) -> Res2Net | FeatureListNet:
    """Build a variant by name: exactly the network ``train.py model=<name>`` trains.

    ``overrides`` replace the variant's arguments (``MODEL_KNOBS``, ``in_chans``, ``output_stride``); a value of None
    keeps the variant's own value. ``pretrained=True`` loads the released ImageNet weights (the file locations, then
    the Hugging Face hub; cached after the first use). ``features_only=True`` returns the backbone: a
    ``FeatureListNet`` giving the feature maps at ``out_indices`` (see ``res2net.models.features``).
    Raises ValueError for an unknown name, an unknown override or a bad value.
    """
    variant = _variant(name)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid overrides: {', '.join(_OVERRIDES)}")
    arch = {**variant.arch(), **{key: value for key, value in overrides.items() if value is not None}}
    model = Res2Net(num_classes=_IMAGENET_CLASSES if features_only else num_classes, **arch)
    if pretrained:
        path = released_weights(name)
        origin = f"checkpoint {path}"
        load_weights(model, extract_state_dict(read_checkpoint(path), origin=origin), origin)
    return FeatureListNet(model, out_indices) if features_only else model


def resolve_model_config(model_cfg: Mapping) -> dict:
    """``model_cfg`` (a mapping or an OmegaConf node with ``CONFIG_KEYS``) as a plain dict with every None knob
    replaced by the variant's value; num_classes stays as given. Raises ValueError for an unknown key or name."""
    if not isinstance(model_cfg, Mapping):
        raise ValueError(
            f"a model config must be a mapping with keys {', '.join(CONFIG_KEYS)}, got {type(model_cfg).__name__}"
        )
    unknown = sorted(set(model_cfg) - set(CONFIG_KEYS) - set(INIT_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {', '.join(CONFIG_KEYS)}")
    variant = _variant(model_cfg.get("name"))
    resolved = {"name": variant.name, "num_classes": model_cfg.get("num_classes")}
    for knob, default in variant.arch().items():
        value = model_cfg.get(knob)
        value = default if value is None else value
        # Lists (also OmegaConf's) become plain lists, so the result can be written to YAML and compared.
        resolved[knob] = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return resolved


def model_from_config(model_cfg: Mapping, num_classes: int | None = None) -> Res2Net:
    """The network of a model config (see ``resolve_model_config``), as train.py and evaluate.py build it.

    ``num_classes`` is used when the config's num_classes is None (e.g. the class folders of the training data);
    when both are None the model has ImageNet's 1000 classes. Raises ValueError when both are set and differ.
    """
    cfg = resolve_model_config(model_cfg)
    name, stated = cfg.pop("name"), cfg.pop("num_classes")
    if stated is not None and num_classes is not None and stated != num_classes:
        raise ValueError(
            f"model.num_classes={stated} but the caller needs num_classes={num_classes}; "
            f"set model.num_classes={num_classes} or null"
        )
    if stated is None:
        stated = _IMAGENET_CLASSES if num_classes is None else num_classes
    return create_model(name, num_classes=stated, **cfg)
