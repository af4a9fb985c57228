"""Inference preparation: BatchNorm folded into the convolutions, channels_last, optional torch.compile."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .res2net import Bottle2neck, Res2Net

__all__ = ['fold_batchnorm', 'prepare_for_inference']


def prepare_for_inference(model: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the conv before it.

    The outputs equal the (eval-mode) original's up to float rounding; the original is left untouched.
    ``channels_last`` switches the copy's memory format (feed it channels_last inputs for full speed);
    ``compile`` wraps it in ``torch.compile``.
    """
    prepared = copy.deepcopy(model).eval()
    fold_batchnorm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = torch.compile(prepared)
    return prepared


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm2d of a Res2Net into the conv that feeds it (the BN becomes an Identity)."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
        elif isinstance(module, Bottle2neck):
            _fold_pair(module, 'conv1', module, 'bn1')
            for i in range(len(module.convs)):
                _fold_pair(module.convs, str(i), module.bns, str(i))
            _fold_pair(module, 'conv3', module, 'bn3')
        elif isinstance(module, Res2Net):
            # The deep stem's last conv sits inside the conv1 Sequential; bn1 follows the whole Sequential.
            stem = module.conv1
            if isinstance(stem, nn.Sequential):
                _fold_pair(stem, str(len(stem) - 1), module, 'bn1')
            else:
                _fold_pair(module, 'conv1', module, 'bn1')
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f'cannot fold BatchNorm layers without a conv directly before them: {left[:5]}; '
                         'prepare_for_inference supports the Res2Net models of res2net.create_model')
    return model


def _fold_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for conv_name, bn_name in zip(names, names[1:]):
        if isinstance(seq[int(conv_name)], nn.Conv2d) and isinstance(seq[int(bn_name)], nn.BatchNorm2d):
            _fold_pair(seq, conv_name, seq, bn_name)


def _fold_pair(conv_owner: nn.Module, conv_name: str, bn_owner: nn.Module, bn_name: str) -> None:
    conv, bn = conv_owner._modules[conv_name], bn_owner._modules[bn_name]
    if not isinstance(bn, nn.BatchNorm2d):  # already folded
        return
    assert isinstance(conv, nn.Conv2d), f'expected a Conv2d before {bn_name}, got {type(conv).__name__}'
    conv_owner._modules[conv_name] = _folded_conv(conv, bn)
    bn_owner._modules[bn_name] = nn.Identity()


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    # y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta, computed in float64 to keep the rounding small.
    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=dtype)
    fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(dtype))
    return fused
