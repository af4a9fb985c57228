"""Res2Net and Res2NeXt.

Paper: Gao et al., "Res2Net: A New Multi-Scale Backbone Architecture", TPAMI 43(2), 2021
(https://arxiv.org/abs/1904.01169). Official code: https://github.com/Res2Net/Res2Net-PretrainedModels.

Module and parameter names (``conv1``, ``bn1``, ``layer1``, ``convs.i``, ``bns.i``, ``downsample``, ``fc``, ...)
are fixed: the released checkpoints load into this module tree with ``strict=True`` and without any key renaming.
Do not rename them. The variants and their arguments are listed in ``variants.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Bottle2neck", "OUTPUT_STRIDES", "Res2Net", "STEMS"]

STEMS = ("", "deep")
OUTPUT_STRIDES = (8, 16, 32)
_DEEP_STEM_WIDTH = 32
_STAGE_PLANES = (64, 128, 256, 512)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_layers(layers: object) -> tuple[int, ...]:
    # Accept any sequence (list, tuple, OmegaConf ListConfig) of four positive integers.
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
        raise ValueError(f"layers must be a list of 4 integers >= 1 (blocks per stage), got {layers!r}")
    layers = list(layers)
    for i, n in enumerate(layers):
        _check_int(f"layers[{i}]", n, 1)
    return tuple(layers)


def _drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Block i of n drops its residual branch at rate * i / (n - 1): none at the first block, ``rate`` at the last."""
    return [rate * i / max(blocks - 1, 1) for i in range(blocks)]


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: a 1x1 conv, ``scale`` splits joined by hierarchical 3x3 convs, a 1x1 conv, a shortcut.

    In the first block of a stage every split but the last is convolved on its own and the last split is
    average-pooled (3x3, count_include_pad=True, even at stride 1: that is what the released weights saw).
    In the other blocks split i is convolved after adding the previous split's output and the last split
    passes through unchanged.

    ``drop_path``: stochastic depth (Huang et al. 2016) at this rate: in training, each sample's residual branch is
    dropped with this probability and scaled by 1 / (1 - rate) otherwise; in eval the branch is used as is.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cardinality: int = 1,
        base_width: int = 26,
        scale: int = 4,
        drop_path: float = 0.0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        _check_int("scale", scale, 1)
        _check_int("dilation", dilation, 1)
        _check_rate("drop_path", drop_path)
        _check_int("base_width", base_width, 1)
        _check_int("cardinality", cardinality, 1)
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.width = width = math.floor(planes * base_width / 64) * cardinality
        num_convs = max(1, scale - 1)
        outplanes = planes * self.expansion

        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(
                    width,
                    width,
                    kernel_size=3,
                    stride=stride,
                    padding=dilation,
                    dilation=dilation,
                    groups=cardinality,
                    bias=False,
                )
                for _ in range(num_convs)
            ]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(num_convs)])
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first and scale > 1 else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = float(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)

        out = self.relu(self.bn1(self.conv1(x)))
        splits = torch.split(out, self.width, dim=1)
        outs = []
        sp = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = splits[i] if i == 0 or self.is_first else sp + splits[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        if self.scale > 1:
            outs.append(self.pool(splits[-1]) if self.pool is not None else splits[-1])
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        if self.training and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            out = out * out.new_empty((out.shape[0], 1, 1, 1)).bernoulli_(keep).div_(keep)
        return self.relu(out + shortcut)


class Res2Net(nn.Module):
    """Res2Net network: stem, four stages of Bottle2neck blocks, global average pool, dropout, linear classifier.

    Args:
        layers: blocks per stage (4 integers >= 1).
        base_width: width of one split at planes=64 (split width = floor(planes * base_width / 64) * cardinality).
        scale: number of splits per block (1 = a plain ResNet bottleneck).
        cardinality: groups of the 3x3 convs (Res2NeXt when > 1).
        stem: '' for the 7x7 stem, 'deep' for three 3x3 convs (widths 32, 32, 64) as in the 'd' variants.
        avg_down: shortcut downsampling by a 2x2 average pool before a stride-1 1x1 conv ('d' variants).
        num_classes: classifier outputs; 0 drops the classifier (``fc`` becomes an identity).
        in_chans: input image channels.
        drop_rate: dropout probability before ``fc``.
        zero_init_last: zero the last BN weight of every block, so each block starts as the identity.
        output_stride: input size / feature map size (32, 16 or 8); below 32 the last stage(s) keep their input
            resolution and dilate their 3x3 convs instead (a backbone for dense prediction), as timm does.
        drop_path_rate: stochastic depth of the last block; the rate grows linearly with the block's index over the
            whole network, from 0 at the first block (timm's rule for ResNets).
    """

    def __init__(
        self,
        layers: Sequence[int],
        base_width: int = 26,
        scale: int = 4,
        cardinality: int = 1,
        stem: str = "",
        avg_down: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
        drop_path_rate: float = 0.0,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        layers = _check_layers(layers)
        _check_int("scale", scale, 1)
        _check_int("base_width", base_width, 1)
        _check_int("cardinality", cardinality, 1)
        _check_int("num_classes", num_classes, 0)
        _check_int("in_chans", in_chans, 1)
        _check_bool("avg_down", avg_down)
        _check_bool("zero_init_last", zero_init_last)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        _check_rate("drop_rate", drop_rate)
        _check_rate("drop_path_rate", drop_path_rate)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        self.num_classes = num_classes
        self.drop_rate = float(drop_rate)

        # The module names below are the released checkpoints' key names.
        if stem == "deep":
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, _DEEP_STEM_WIDTH, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(_DEEP_STEM_WIDTH),
                nn.ReLU(inplace=True),
                nn.Conv2d(_DEEP_STEM_WIDTH, _DEEP_STEM_WIDTH, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(_DEEP_STEM_WIDTH),
                nn.ReLU(inplace=True),
                nn.Conv2d(_DEEP_STEM_WIDTH, 2 * _DEEP_STEM_WIDTH, 3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # timm's feature_info: channels, reduction (input size / map size) and module of each feature map.
        self.feature_info = [dict(num_chs=64, reduction=2, module="relu")]
        inplanes, reduction, dilation = 64, 4, 1
        rates = _drop_path_rates(drop_path_rate, sum(layers))
        for index, (planes, blocks) in enumerate(zip(_STAGE_PLANES, layers)):
            stride = 1 if index == 0 else 2
            first_dilation = dilation
            if reduction >= output_stride:  # trade the stride for dilation from here on
                stride, dilation = 1, dilation * stride
            reduction *= stride
            first = sum(layers[:index])
            stage = self._make_stage(
                inplanes,
                planes,
                stride,
                base_width,
                scale,
                cardinality,
                avg_down,
                rates[first : first + blocks],
                first_dilation,
                dilation,
            )
            self.add_module(f"layer{index + 1}", stage)
            inplanes = planes * Bottle2neck.expansion
            self.feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=f"layer{index + 1}"))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights(zero_init_last)

    @staticmethod
    def _make_stage(
        inplanes: int,
        planes: int,
        stride: int,
        base_width: int,
        scale: int,
        cardinality: int,
        avg_down: bool,
        drop_paths: Sequence[float],
        first_dilation: int = 1,
        dilation: int = 1,
    ) -> nn.Sequential:
        # The first block keeps the previous stage's dilation (first_dilation), the others use the stage's own.
        outplanes = planes * Bottle2neck.expansion
        downsample = None
        if stride != 1 or inplanes != outplanes:
            if avg_down:
                downsample = nn.Sequential(
                    _shortcut_pool(stride, dilation),
                    nn.Conv2d(inplanes, outplanes, 1, stride=1, bias=False),
                    nn.BatchNorm2d(outplanes),
                )
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
                )
        stage = [
            Bottle2neck(
                inplanes, planes, stride, downsample, cardinality, base_width, scale, drop_paths[0], first_dilation
            )
        ]
        stage += [
            Bottle2neck(outplanes, planes, 1, None, cardinality, base_width, scale, p, dilation) for p in drop_paths[1:]
        ]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottle2neck):
                    m.zero_init_last()

    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``), as timm names it."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: an identity, the
        pooled features come out), on the device and dtype of the network; timm's method of the same name."""
        _check_int("num_classes", num_classes, 0)
        like = self.conv1.weight if isinstance(self.conv1, nn.Conv2d) else self.conv1[0].weight
        self.num_classes = num_classes
        self.fc = (
            nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _shortcut_pool(stride: int, dilation: int) -> nn.Module:
    """The 2x2 average pool before the 'd' variants' shortcut conv."""
    if dilation > 1:
        # A dilated stage keeps its resolution: timm's AvgPool2dSame(2, stride=1), i.e. one row and one column of
        # zeros padded after the input (counted in the average), so the weights give the same maps as in timm.
        return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride=1))
    if stride > 1:
        return nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Identity()
