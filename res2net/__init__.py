"""Res2Net ImageNet training and evaluation recipe (Gao et al., TPAMI 2021)."""
from .models import create_model, list_models, load_pretrained, prepare_for_inference

__all__ = ['create_model', 'list_models', 'load_pretrained', 'prepare_for_inference']
