"""Fine-tuning knobs: freezing the network up to a depth (``trainer.freeze``), keeping frozen BatchNorm layers in
eval mode (``trainer.freeze_bn_eval``) and per-depth learning-rate multipliers (``optim.head_lr_mult``,
``optim.layer_decay``) that ``res2net.engine.optim.param_groups`` turns into parameter groups.

Depths follow the module names the released checkpoints use: the stem (``conv1``, ``bn1``) is depth 0, the stages
``layer1`` ... ``layer4`` depths 1-4, the classifier ``fc`` depth 5 (the head).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from res2net.config import Freeze

__all__ = [
    "FREEZE_CHOICES",
    "HEAD_DEPTH",
    "depth_of",
    "freeze",
    "log_allowed_changes",
    "lr_scales",
    "prepare_model",
    "start_weights",
]

log = logging.getLogger(__name__)

# trainer.freeze: none | stem | layer1 ... layer4 (the stem and every stage up to that one) | backbone (everything
# but the classifier; the same parameters as layer4 for Res2Net, named for what it means).
FREEZE_CHOICES = tuple(m.value for m in Freeze)
HEAD_DEPTH = 5
_DEPTH_OF_MODULE = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4, "fc": HEAD_DEPTH}
_FREEZE_DEPTH = {"none": -1, "stem": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4, "backbone": 4}


def depth_of(name: str) -> int:
    """The depth of a parameter or module name of a Res2Net (0 stem, 1-4 stages, 5 classifier)."""
    top = name.split(".", 1)[0]
    if top not in _DEPTH_OF_MODULE:
        raise ValueError(f"{name!r} is not a Res2Net parameter (top-level modules: {', '.join(_DEPTH_OF_MODULE)})")
    return _DEPTH_OF_MODULE[top]


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


_FROZEN_CLASSES: dict[type, type] = {}


def _keep_in_eval(module: nn.Module) -> None:
    """Make ``module`` ignore ``train()``: its class becomes a subclass whose ``train`` always sets eval mode. The
    state_dict, isinstance checks (BatchNorm folding) and deepcopy (EMA) are unchanged."""
    cls = type(module)
    if cls not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[cls] = type(f"Frozen{cls.__name__}", (cls,), {"train": _eval_only_train})
    module.__class__ = _FROZEN_CLASSES[cls]
    module.eval()


def freeze(model: nn.Module, upto: str, bn_eval: bool = True) -> list[str]:
    """Stop the gradients of every parameter up to ``upto`` (``FREEZE_CHOICES``); with ``bn_eval`` the BatchNorm
    layers there also stay in eval mode (running statistics neither used from the batch nor updated), whatever
    ``model.train()`` says. Returns the frozen parameter names. Call it before building the optimizer (which takes
    only parameters that require gradients) and after any SyncBatchNorm conversion."""
    if upto not in FREEZE_CHOICES:
        raise ValueError(f"trainer.freeze={upto!r} is invalid; use one of {' | '.join(FREEZE_CHOICES)}")
    limit = _FREEZE_DEPTH[upto]
    frozen = []
    for name, param in model.named_parameters():
        if depth_of(name) <= limit:
            param.requires_grad_(False)
            frozen.append(name)
    if bn_eval:
        for name, module in model.named_modules():
            if name and isinstance(module, nn.modules.batchnorm._BatchNorm) and depth_of(name) <= limit:
                _keep_in_eval(module)
    return frozen


def lr_scales(model: nn.Module, head_lr_mult: float = 1.0, layer_decay: float = 1.0) -> dict[str, float] | None:
    """Each parameter's lr multiplier: ``layer_decay ** (HEAD_DEPTH - depth)`` (the head 1, layer4 ``layer_decay``,
    ..., the stem ``layer_decay ** 5``; timm's layer-wise decay over six groups), the head's times ``head_lr_mult``.
    None when both are 1 (one lr for every parameter: the optimizer's groups stay as they were)."""
    if head_lr_mult <= 0 or not 0 < layer_decay <= 1:
        raise ValueError(
            f"optim.head_lr_mult={head_lr_mult} must be > 0 and optim.layer_decay={layer_decay} in (0, 1] (1 = off)"
        )
    if head_lr_mult == 1.0 and layer_decay == 1.0:
        return None
    scales = {}
    for name, _ in model.named_parameters():
        depth = depth_of(name)
        scales[name] = layer_decay ** (HEAD_DEPTH - depth) * (head_lr_mult if depth == HEAD_DEPTH else 1.0)
    return scales


def start_weights(cfg: Any, config: dict, ckpt: Mapping | None, dist: Any) -> Path | None:
    """The local file a fresh run initialises from (None: none, or a resume, which wins), and ``config['init']``
    (source, sha256) set for config.yaml and the checkpoints. A resume keeps the record of the run's start."""
    from res2net.engine.distributed import barrier
    from res2net.models.download import sha256_file
    from res2net.models.loading import init_source, resolve_init_file

    if ckpt is not None:
        saved = ckpt["config"].get("init") if isinstance(ckpt.get("config"), Mapping) else None
        if saved is not None:
            config["init"] = saved
        if init_source(cfg.model) and dist.is_main:
            log.info("resuming the run directory's checkpoint: it wins over %s", init_source(cfg.model))
        return None
    source = init_source(cfg.model)
    if source is None:
        return None
    if dist.is_main:  # rank 0 downloads; the others find the file in the cache
        path = resolve_init_file(source)
    barrier()
    if not dist.is_main:
        path = resolve_init_file(source)
    config["init"] = {"source": source, "sha256": sha256_file(path)}
    return path


def prepare_model(
    model: nn.Module, cfg: Any, init_file: Path | None, dist: Any, classes: Sequence[str] | None = None
) -> None:
    """Initialise ``model`` from ``init_file`` (``start_weights``; ``classes``: the training data's, a source made
    for other classes gets a new head) and freeze it as ``trainer.freeze`` says."""
    from res2net.models.loading import init_source, initialise

    if init_file is not None:
        what = "model.init_checkpoint" if cfg.model.init_checkpoint else "model.pretrained"
        initialise(model, init_source(cfg.model), path=init_file, classes=classes, what=what, verbose=dist.is_main)
    frozen = freeze(model, cfg.trainer.freeze, cfg.trainer.freeze_bn_eval)
    if frozen and dist.is_main:
        log.info(
            "trainer.freeze=%s: %d parameter tensors frozen (%d of %d values)%s",
            cfg.trainer.freeze,
            len(frozen),
            sum(p.numel() for p in model.parameters() if not p.requires_grad),
            sum(p.numel() for p in model.parameters()),
            ", their BatchNorm layers in eval mode" if cfg.trainer.freeze_bn_eval else "",
        )


def log_allowed_changes(saved: Mapping, current: Mapping, allow: Iterable[str]) -> list[str]:
    """Log each key that differs from the checkpoint's config under ``resume_allow``; returns their lines."""
    from res2net.engine.checkpoint import _flatten, _may_differ

    allow = list(allow)
    old, new = _flatten(saved), _flatten(current)
    changed = [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(old.keys() | new.keys())
        if key != "resume_allow" and _may_differ(key, allow) and old.get(key, "<absent>") != new.get(key, "<absent>")
    ]
    if changed:
        log.warning(
            "resume_allow: resuming with a changed config (%s); from here on the run is no longer the uninterrupted "
            "trajectory of one config",
            "; ".join(changed),
        )
    return changed
