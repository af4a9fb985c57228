"""The Res2Net family: network, variant table, registry, released weights, statistics, inference preparation.

Imports with torch alone.
"""

from .download import download_checkpoint
from .inference import prepare_for_inference
from .loading import load_pretrained
from .registry import CONFIG_KEYS, create_model, list_models, model_from_config, resolve_model_config
from .res2net import Bottle2neck, Res2Net
from .variants import MODEL_KNOBS, RELEASED, VARIANTS, Variant

__all__ = [
    "CONFIG_KEYS",
    "MODEL_KNOBS",
    "RELEASED",
    "VARIANTS",
    "Bottle2neck",
    "Res2Net",
    "Variant",
    "create_model",
    "download_checkpoint",
    "list_models",
    "load_pretrained",
    "model_from_config",
    "prepare_for_inference",
    "resolve_model_config",
]
