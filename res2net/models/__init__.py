"""The Res2Net family: network, variant registry, released weights, statistics, inference preparation.

Imports with torch alone.
"""
from . import res2net as _variants  # noqa: F401  (registers the variants)
from .inference import prepare_for_inference
from .pretrained import RELEASED, download_checkpoint, load_pretrained
from .registry import create_model, list_models
from .res2net import Bottle2neck, Res2Net

__all__ = ['RELEASED', 'Bottle2neck', 'Res2Net', 'create_model', 'download_checkpoint', 'list_models',
           'load_pretrained', 'prepare_for_inference']
