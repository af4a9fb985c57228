"""Res2Net as a backbone: the feature maps of the stem and the four stages, with timm's ``feature_info``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["FEATURE_INDICES", "FeatureInfo", "FeatureListNet", "check_out_indices"]

# 0: the stem activation (stride 2); 1-4: the outputs of layer1 .. layer4.
FEATURE_INDICES = (0, 1, 2, 3, 4)


def check_out_indices(out_indices: object) -> tuple[int, ...]:
    """``out_indices`` as a tuple of distinct, increasing feature indices; ValueError otherwise."""
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence) or not out_indices:
        raise ValueError(
            f"out_indices must be a non-empty list of feature indices from {FEATURE_INDICES} "
            f"(0 = stem, 1-4 = layer1-layer4), got {out_indices!r}"
        )
    indices = tuple(out_indices)
    if any(i not in FEATURE_INDICES or isinstance(i, bool) for i in indices) or list(indices) != sorted(set(indices)):
        raise ValueError(
            f"out_indices must be distinct increasing indices from {FEATURE_INDICES} "
            f"(0 = stem, 1-4 = layer1-layer4), got {out_indices!r}"
        )
    return indices


class FeatureInfo:
    """The channels, reductions and module names of the returned feature maps, with timm's method names."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]) -> None:
        self.info = [dict(entry) for entry in info]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> list | object:
        """``key`` of every returned map (idx None), of the idx-th returned map, or of several."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def get_dicts(self) -> list[dict]:
        return [dict(self.info[i]) for i in self.out_indices]

    def channels(self, idx: int | Sequence[int] | None = None) -> list | int:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> list | int:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> list | str:
        return self.get("module", idx)

    def __getitem__(self, idx: int) -> dict:
        return dict(self.info[self.out_indices[idx]])

    def __len__(self) -> int:
        return len(self.out_indices)


class FeatureListNet(nn.ModuleDict):
    """The network's modules up to the last wanted feature map, run in order; forward returns the wanted maps.

    It holds the classifier's own modules under their own names (no ``fc``), so its state_dict is the classifier's
    minus ``fc`` and released weights load into it unchanged. ``feature_info`` describes the returned maps.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = FEATURE_INDICES) -> None:
        out_indices = check_out_indices(out_indices)
        info = model.feature_info
        wanted = [info[i]["module"] for i in out_indices]
        modules = {}
        # The children are registered in execution order (stem, maxpool, layer1..layer4, fc): run them so.
        for name, module in model.named_children():
            modules[name] = module
            if name == wanted[-1]:
                break
        super().__init__(modules)
        self.return_layers = frozenset(wanted)
        self.feature_info = FeatureInfo(info, out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        return features
