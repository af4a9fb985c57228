"""Model statistics: parameters and multiply-accumulates (timm's GMACs convention), counted by forward hooks.

GMACs: one per multiply-add of conv and linear layers, two per batch-norm output element (scale and shift);
activations, pooling and additions are not counted. ``python -m res2net.models.stats`` prints both for every
variant next to the published values of ``res2net.models.variants``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from .registry import create_model, list_models
from .variants import VARIANTS

__all__ = ["count_macs", "count_params", "stats_table"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kernel_h, kernel_w = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _bn_macs(module: nn.BatchNorm2d, output: torch.Tensor) -> int:
    return 2 * output.numel()


_COUNTERS = ((nn.Conv2d, _conv_macs), (nn.Linear, _linear_macs), (nn.BatchNorm2d, _bn_macs))


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass of a single image of img_size x img_size (timm's convention).

    Runs on the model's device; a model built under ``torch.device('meta')`` is counted without any arithmetic.
    The model is put in eval mode for the pass and restored afterwards.
    """
    first = next(model.parameters())
    in_chans = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        counter = next(fn for kind, fn in _COUNTERS if isinstance(module, kind))
        total += counter(module, output)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, tuple(kind for kind, _ in _COUNTERS))
    ]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, in_chans, img_size, img_size, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def _published(value: int | float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def stats_table(names: list[str] | None = None, img_size: int = 224) -> str:
    """A Markdown table of parameters and GMACs for the named variants (default: all), published values beside."""
    rows = ["| model | params | published params | GMACs | published GMACs |", "|---|---:|---:|---:|---:|"]
    for name in names or list_models():
        with torch.device("meta"):
            model = create_model(name)
        params, macs, variant = count_params(model), count_macs(model, img_size), VARIANTS[name]
        rows.append(
            f"| {name} | {params:,} | {_published(variant.params, ',')} | {macs / 1e9:.3f} | "
            f"{_published(variant.gmacs, '.2f')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"variants (default: all): {', '.join(list_models())}")
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join(list_models())}")
    print(
        f"Parameters and GMACs at {args.img_size}x{args.img_size} "
        "(1 per conv/linear multiply-add + 2 per BN output element)"
    )
    print(stats_table(args.models or None, args.img_size))


if __name__ == "__main__":
    main()
