"""From a spec to a network with weights: the one place where training (the distillation teacher), evaluation,
export and prediction turn a variant name, a local file, a URL or a train.py checkpoint into a model.

Fetching (``pretrained.download_checkpoint``, ``hub.released_weights``) and reading (``pretrained.read_checkpoint``,
tensors-only) stay in their own modules; this one composes them and builds the architecture a checkpoint was made
for (a train.py checkpoint records it in ``config['model']``).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as dist
from torch import nn

from res2net.errors import CheckpointError

from .guard import check_declared_architecture
from .hub import released_weights
from .pretrained import download_checkpoint, extract_state_dict, load_weights, read_checkpoint
from .registry import model_from_config, resolve_model_config
from .variants import VARIANTS

__all__ = [
    "build_model_for",
    "fetch_checkpoint",
    "load_checkpoint_model",
    "load_pretrained",
    "read_checkpoint_dict",
    "saved_model_config",
]

log = logging.getLogger(__name__)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fetch_checkpoint(spec: str | os.PathLike, key: str = "checkpoint") -> Path:
    """The local file of ``spec``: a variant name (its released weights: the file locations, then the hub), an
    http(s) URL (downloaded into the cache) or an existing path. Under torch.distributed rank 0 downloads while the
    others wait, then find the file in the cache. ``key`` names the setting in the error for a missing file."""
    text = os.fspath(spec)
    remote = text in VARIANTS or text.startswith(("http://", "https://"))
    if not remote:
        path = Path(text).expanduser()
        if not path.exists():  # a directory or a damaged file: read_checkpoint says what is wrong with it
            raise FileNotFoundError(
                f"{key}={text!r} is not a file: pass the path of a released .pth / .safetensors file or of a "
                f"train.py checkpoint, an http(s) URL, or a model name with released weights "
                f"({', '.join(sorted(VARIANTS))})"
            )
        return path
    if _is_main():
        path = _download(text)
    _barrier()
    return path if _is_main() else _download(text)


def _download(text: str) -> Path:
    if text in VARIANTS:
        return released_weights(text)
    return download_checkpoint(Path(urllib.parse.urlparse(text).path).name, urls=(text,))


def read_checkpoint_dict(path: Path, trusted: bool = False) -> Mapping:
    """The dict in a checkpoint file, read tensors-only unless ``trusted`` (see ``pretrained.read_checkpoint``)."""
    obj = read_checkpoint(path, trusted=trusted)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    return obj


def saved_model_config(checkpoint: Mapping) -> Mapping | None:
    """The model config a train.py checkpoint records (its weights fit nothing else), None for other files."""
    config = checkpoint.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    return model if isinstance(model, Mapping) and model.get("name") else None


def _model_config(model_cfg: Mapping, checkpoint: Mapping) -> dict:
    """The architecture to build: a train.py checkpoint's own model config, otherwise ``model_cfg``."""
    model_cfg = dict(model_cfg)
    saved = saved_model_config(checkpoint)
    if saved is not None:
        asked = model_cfg.get("name")
        if asked and saved["name"] != asked:
            log.warning("the checkpoint was trained as %s; building that instead of model=%s", saved["name"], asked)
        model_cfg = {**model_cfg, **dict(saved)}
    return model_cfg


def build_model_for(
    model_cfg: Mapping, checkpoint: Mapping, use_ema: bool = False, origin: str = "checkpoint"
) -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights loaded strictly, the model config used). num_classes null -> the
    classifier's size in the checkpoint. ``origin`` names the checkpoint in errors."""
    cfg = _model_config(model_cfg, checkpoint)
    state = extract_state_dict(checkpoint, use_ema=use_ema, origin=origin)
    if cfg.get("num_classes") is None:
        if "fc.weight" not in state:
            raise ValueError(
                "model.num_classes is null and the checkpoint has no fc.weight to infer it from; set model.num_classes"
            )
        cfg["num_classes"] = int(state["fc.weight"].shape[0])
    cfg = resolve_model_config(cfg)
    check_declared_architecture(cfg, state, origin)  # before anything of that size is allocated
    model = model_from_config(cfg)
    load_weights(model, state, origin)
    return model, cfg


def load_checkpoint_model(
    spec: str | os.PathLike,
    model_cfg: Mapping | None = None,
    *,
    use_ema: bool = False,
    trusted: bool = False,
    key: str = "checkpoint",
) -> tuple[nn.Module, dict, Path, Mapping]:
    """(model, its resolved config, the local file, the checkpoint dict) for ``spec`` (see ``fetch_checkpoint``).

    The architecture: ``model_cfg``, or the variant a name stands for, or what a train.py checkpoint records; a file
    that records none with no ``model_cfg`` is a ValueError naming ``key``.
    """
    text = os.fspath(spec)
    path = fetch_checkpoint(text, key)
    checkpoint = read_checkpoint_dict(path, trusted=trusted)
    if model_cfg is None:
        if text in VARIANTS:
            model_cfg = {"name": text}
        elif saved_model_config(checkpoint) is None:
            raise ValueError(
                f"{key}={text!r}: the file records no architecture (it is not a train.py checkpoint); pass a "
                f"variant name ({', '.join(sorted(VARIANTS))}) for released weights, or a checkpoint train.py wrote"
            )
        else:
            model_cfg = {}
    model, cfg = build_model_for(model_cfg, checkpoint, use_ema, f"checkpoint {path}")
    return model, cfg, path, checkpoint


def load_pretrained(
    model: nn.Module, source: str | os.PathLike | Mapping, use_ema: bool = False, trusted: bool = False
) -> None:
    """Load weights into ``model`` (strict) from a URL, a local file (.pth / .pt, or .safetensors), a released model
    name or a checkpoint dict.

    Files are read tensors-only (see ``pretrained.read_checkpoint``); ``trusted=True`` also reads one that needs
    Python's full unpickler, which can run arbitrary code: only for files whose origin you trust. Training checkpoints
    are unwrapped (see ``extract_state_dict``). A checkpoint that does not fit raises CheckpointError (a RuntimeError)
    listing missing, unexpected and wrongly shaped keys (first few of each, with counts).
    """
    if isinstance(source, Mapping):
        checkpoint, origin = source, "the given checkpoint dict"
    else:
        text = os.fspath(source)
        if not (text in VARIANTS or text.startswith(("http://", "https://")) or Path(text).expanduser().exists()):
            raise FileNotFoundError(
                f"checkpoint {text!r} not found: it is not a file, not an http(s) URL and not a released "
                f"model name ({', '.join(sorted(VARIANTS))})"
            )
        path = fetch_checkpoint(text)
        checkpoint = read_checkpoint_dict(path, trusted)
        origin = f"released checkpoint {text}" if text in VARIANTS else f"checkpoint {text if '://' in text else path}"
    load_weights(model, extract_state_dict(checkpoint, use_ema=use_ema, origin=origin), origin)
