"""Inference preparation: BatchNorm folded into the convolutions, channels_last, optional torch.compile."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .res2net import Bottle2neck, Res2Net

__all__ = ["prepare_for_inference"]


def prepare_for_inference(model: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the conv before it.

    The outputs equal the (eval-mode) original's up to float rounding; the original is left untouched.
    ``channels_last`` switches the copy's memory format (feed it channels_last inputs for full speed);
    ``compile`` wraps it in ``torch.compile``. Raises ValueError for a BatchNorm without a conv right before it.
    """
    prepared = copy.deepcopy(model).eval()
    _fold_batchnorm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = torch.compile(prepared)
    return prepared


def _fold_batchnorm(model: nn.Module) -> None:
    """Fold, in place, every BatchNorm2d of an eval-mode Res2Net into the conv that feeds it (the BN becomes an
    Identity)."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for conv_name, bn_name in zip(names, names[1:], strict=False):
                if isinstance(module[int(conv_name)], nn.Conv2d):
                    _fold_pair(module, conv_name, module, bn_name)
        elif isinstance(module, Bottle2neck):
            _fold_pair(module, "conv1", module, "bn1")
            for i in range(len(module.convs)):
                _fold_pair(module.convs, str(i), module.bns, str(i))
            _fold_pair(module, "conv3", module, "bn3")
        elif isinstance(module, Res2Net):
            # The deep stem's last conv sits inside the conv1 Sequential; bn1 follows the whole Sequential.
            stem = module.conv1
            if isinstance(stem, nn.Sequential):
                _fold_pair(stem, str(len(stem) - 1), module, "bn1")
            else:
                _fold_pair(module, "conv1", module, "bn1")
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(
            f"cannot fold BatchNorm layers without a conv directly before them: {left[:5]}; "
            "prepare_for_inference supports the Res2Net models of res2net.create_model"
        )


def _fold_pair(conv_owner: nn.Module, conv_name: str, bn_owner: nn.Module, bn_name: str) -> None:
    conv, bn = conv_owner._modules[conv_name], bn_owner._modules[bn_name]
    if not isinstance(bn, nn.BatchNorm2d):  # already folded, or not a BN
        return
    assert isinstance(conv, nn.Conv2d), f"expected a Conv2d before {bn_name}, got {type(conv).__name__}"
    conv_owner._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
    bn_owner._modules[bn_name] = nn.Identity()
