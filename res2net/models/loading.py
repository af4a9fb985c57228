"""From a spec to a network with weights: the one place where training (the distillation teacher and the starting
weights of model.pretrained / model.init_checkpoint), evaluation, export and prediction turn a variant name, a local
file, a URL or a train.py checkpoint into a model.

Fetching (``download.download_checkpoint``, ``hub.released_weights``) and reading (``pretrained.read_checkpoint``,
tensors-only) stay in their own modules; this one composes them and builds the architecture a checkpoint was made
for (a train.py checkpoint records it in ``config['model']``).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from res2net.errors import CheckpointError

from .download import download_checkpoint, sha256_file
from .guard import check_declared_architecture
from .hub import released_weights
from .pretrained import extract_state_dict, load_weights, read_checkpoint
from .registry import model_from_config, resolve_model_config
from .variants import VARIANTS

__all__ = [
    "CLASSIFIER_KEYS",
    "InitRecord",
    "build_model_for",
    "fetch_checkpoint",
    "init_source",
    "initialise",
    "load_checkpoint_model",
    "load_pretrained",
    "read_checkpoint_dict",
    "resolve_init_file",
    "saved_model_config",
]

log = logging.getLogger(__name__)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fetch_checkpoint(spec: str | os.PathLike, key: str = "checkpoint", hint: str = "") -> Path:
    """The local file of ``spec``: a variant name (its released weights: the file locations, then the hub), an
    http(s) URL (downloaded into the cache) or an existing path. Under torch.distributed rank 0 downloads while the
    others wait, then find the file in the cache. ``key`` names the setting in the error for a missing file, ``hint``
    adds the caller's own alternative to it."""
    text = os.fspath(spec)
    remote = text in VARIANTS or text.startswith(("http://", "https://"))
    if not remote:
        path = Path(text).expanduser()
        if not path.exists():  # a directory or a damaged file: read_checkpoint says what is wrong with it
            raise FileNotFoundError(
                f"{key}={text!r} is not a file: pass the path of a released .pth / .safetensors file or of a "
                f"train.py checkpoint, an http(s) URL, or a model name with released weights "
                f"({', '.join(sorted(VARIANTS))}){hint}"
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
    hint: str = "",
) -> tuple[nn.Module, dict, Path, Mapping]:
    """(model, its resolved config, the local file, the checkpoint dict) for ``spec`` (see ``fetch_checkpoint``).

    The architecture: ``model_cfg``, or the variant a name stands for, or what a train.py checkpoint records; a file
    that records none with no ``model_cfg`` is a ValueError naming ``key``.
    """
    text = os.fspath(spec)
    path = fetch_checkpoint(text, key, hint)
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


# --- Initialising a training run from weights (model.pretrained / model.init_checkpoint) -------------------------
# Initialising, not resuming: only the weights of the source are used (the optimizer, schedule, position and
# generators start fresh). The classifier (``fc.*``) is re-initialised when its size differs from the model's, or when
# the source records other class names; any other mismatch is one error naming the keys.

CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
_HF_WEIGHTS = "model.safetensors"
_SHOW = 6


@dataclass(frozen=True)
class InitRecord:
    """Where a run's starting weights came from (config.yaml's and every checkpoint's ``init``)."""

    source: str  # as given: a path, a URL, a variant name, or 'pretrained:<variant>'
    file: str  # the local file read
    sha256: str
    reinitialised: tuple[str, ...]  # keys the source had with another shape and that start fresh (the classifier)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "file": self.file,
            "sha256": self.sha256,
            "reinitialised": list(self.reinitialised),
        }


def init_source(model_cfg: Any) -> str | None:
    """The weights a model config starts from: its init_checkpoint, the variant name for pretrained=true, or None."""
    get = model_cfg.get if isinstance(model_cfg, Mapping) else lambda key: getattr(model_cfg, key, None)
    if get("init_checkpoint"):
        return str(get("init_checkpoint"))
    if get("pretrained"):
        return str(get("name"))
    return None


def resolve_init_file(spec: str) -> Path:
    """The local file of an init spec: an exported HF folder (its model.safetensors), or what ``fetch_checkpoint``
    finds (a file, an http(s) URL downloaded into the cache, a variant name's released weights; rank 0 downloads)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        weights = path / _HF_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(
                f"model.init_checkpoint={spec}: the folder has no {_HF_WEIGHTS} (an exported HF folder has one); "
                "name a checkpoint file instead"
            )
        return weights
    return fetch_checkpoint(spec, key="model.init_checkpoint")


def _keys(keys: list[str]) -> str:
    more = f" ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def initialise(
    model: nn.Module,
    spec: str,
    *,
    path: Path | None = None,
    classes: Sequence[str] | None = None,
    what: str = "model.init_checkpoint",
    verbose: bool = True,
) -> InitRecord:
    """Load the weights of ``spec`` (read from ``path`` when given: ``resolve_init_file(spec)``) into ``model``
    except a classifier for other classes, which keeps the model's fresh initialisation: one of another size, or,
    when the source records its class names (a train.py checkpoint) and ``classes`` (the new training data's) are
    given, one whose names differ. Returns the record. CheckpointError (one line, naming the keys) for any other
    mismatch."""
    path = Path(path) if path is not None else resolve_init_file(spec)
    obj = read_checkpoint_dict(path)  # tensors only, never the full unpickler
    state = extract_state_dict(obj, origin=f"{what}={spec}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    reinit = [k for k in shaped if k in CLASSIFIER_KEYS]
    if set(CLASSIFIER_KEYS) & set(reinit):  # both or neither: a classifier is one layer
        reinit = [k for k in CLASSIFIER_KEYS if k in state]
    wrong = [k for k in shaped if k not in reinit]
    source_classes = obj.get("classes")
    other_classes = (
        classes is not None
        and isinstance(source_classes, Sequence)
        and list(map(str, source_classes)) != list(map(str, classes))
    )
    if other_classes and not reinit:  # same size, other meaning: digits 0-4 are not digits 5-9
        reinit = [k for k in CLASSIFIER_KEYS if k in state]
    # A source without a classifier (a features-only file) gives the model's fresh one too.
    missing_head = [k for k in missing if k in CLASSIFIER_KEYS]
    missing = [k for k in missing if k not in CLASSIFIER_KEYS]
    if missing or unexpected or wrong:
        parts = [
            f"{title} {_keys(keys)}"
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if keys
        ]
        raise CheckpointError(
            f"{what}={spec} does not fit {type(model).__name__} ({'; '.join(parts)}): build the architecture it "
            "was trained as (model=<its variant> and the same model.* overrides)"
        )
    load = {k: v for k, v in state.items() if k not in reinit}
    with torch.no_grad():
        model.load_state_dict(load, strict=False)
    fresh = tuple(reinit + missing_head)
    if not verbose:
        pass
    elif fresh:
        old = state["fc.weight"].shape[0] if "fc.weight" in state else "no"
        log.info(
            "initialised from %s; re-initialised %s (the source has %s classes%s, the model %d%s)",
            spec,
            ", ".join(fresh),
            old,
            f" {_keys(list(map(str, source_classes)))}" if other_classes else "",
            expected["fc.weight"].shape[0] if "fc.weight" in expected else 0,
            f" {_keys(list(map(str, classes)))}" if other_classes else "",
        )
    else:
        log.info("initialised from %s (every key, the classifier included)", spec)
    return InitRecord(source=spec, file=os.fspath(path), sha256=sha256_file(path), reinitialised=fresh)
