"""Start training from weights (``model.pretrained`` / ``model.init_checkpoint``): initialising, not resuming.

The source is read tensors-only: a train.py checkpoint (its ``model`` weights), a released .pth, a .safetensors file,
an exported Hugging Face folder (its model.safetensors), an http(s) URL (downloaded into the cache) or a variant name
(its released weights, through the loader ``create_model(pretrained=True)`` uses). The classifier (``fc.*``) is
re-initialised when its size differs from the model's (the new task's classes); any other mismatch is one error naming
the keys. Nothing else of the source is used: the optimizer, schedule, position and generators start fresh.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from res2net.errors import CheckpointError

from .pretrained import download_checkpoint, extract_state_dict, read_checkpoint, sha256_file
from .variants import VARIANTS

__all__ = ["CLASSIFIER_KEYS", "InitRecord", "init_source", "initialise", "resolve_init_file"]

log = logging.getLogger(__name__)

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


def init_source(model_cfg: Mapping) -> str | None:
    """The weights a model config starts from: its init_checkpoint, the variant name for pretrained=true, or None."""
    if model_cfg.get("init_checkpoint"):
        return str(model_cfg["init_checkpoint"])
    if model_cfg.get("pretrained"):
        return str(model_cfg["name"])
    return None


def resolve_init_file(spec: str) -> Path:
    """The local file of an init spec: a file, an exported HF folder (its model.safetensors), an http(s) URL
    (downloaded into the cache) or a variant name (its released weights)."""
    if spec.startswith(("http://", "https://")):
        file = Path(urllib.parse.urlparse(spec).path).name
        return download_checkpoint(file, urls=(spec,))
    path = Path(spec).expanduser()
    if path.is_dir():
        weights = path / _HF_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(
                f"model.init_checkpoint={spec}: the folder has no {_HF_WEIGHTS} (an exported HF folder has one); "
                "name a checkpoint file instead"
            )
        return weights
    if path.exists():
        return path
    if spec in VARIANTS:
        from .hub import released_weights

        return released_weights(spec)
    raise FileNotFoundError(
        f"model.init_checkpoint={spec!r} is not a file, a folder, an http(s) URL or a model name "
        f"({', '.join(sorted(VARIANTS))})"
    )


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
    obj = read_checkpoint(path)  # tensors only, never the full unpickler
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what}={spec}: {path} holds a {type(obj).__name__}, not weights")
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
