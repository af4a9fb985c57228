"""The Hugging Face hub as the third home of the released weights: ``timm/<name>.in1k``, ``model.safetensors``.

``released_weights(name)`` tries the two public file locations first (``res2net.models.pretrained``) and the hub
when they fail; res2net50d and res2net101d live only on the hub. The hub files go to ``<cache_dir()>/hub`` through
``huggingface_hub`` (imported lazily), which honours ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``; they are
safetensors files, so reading them runs no pickle.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .pretrained import cache_dir, download_checkpoint
from .variants import RELEASED, VARIANTS

__all__ = ["HUB_FILE", "HUB_REPOS", "download_from_hub", "released_weights"]

logger = logging.getLogger(__name__)

HUB_FILE = "model.safetensors"
HUB_REPOS = {name: variant.hub_id for name, variant in VARIANTS.items()}  # timm/<name>.in1k


def download_from_hub(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Path of ``timm/<name>.in1k``'s model.safetensors in the cache, downloaded first if needed.

    Raises ValueError for a name without a hub copy, ImportError without huggingface_hub, and huggingface_hub's
    errors (OSError subclasses) when the hub cannot deliver the file.
    """
    if name not in HUB_REPOS:
        raise ValueError(f"no hub copy of {name!r}; models on the hub: {', '.join(sorted(HUB_REPOS))}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise ImportError(
            f"fetching {name} from the Hugging Face hub needs huggingface_hub: "
            ".venv/bin/pip install -r requirements.txt"
        ) from err
    directory = Path(cache) if cache is not None else cache_dir() / "hub"
    # huggingface_hub reads HF_ENDPOINT once, at import: read it per call so a changed environment applies.
    path = hf_hub_download(HUB_REPOS[name], HUB_FILE, cache_dir=directory, endpoint=os.environ.get("HF_ENDPOINT"))
    return Path(path)


def released_weights(name: str) -> Path:
    """Local file of a variant's released ImageNet weights: the public file locations first, then the hub.

    Raises ValueError for a variant without released weights and RuntimeError naming every source's error when
    none delivers.
    """
    errors = []
    if name in RELEASED:
        try:
            return download_checkpoint(name)
        except RuntimeError as err:
            errors.append(str(err))
            logger.warning("the file locations of %s failed; trying the Hugging Face hub (%s)", name, HUB_REPOS[name])
    elif name not in HUB_REPOS:
        raise ValueError(f"no released weights for {name!r}; released models: {', '.join(sorted(HUB_REPOS))}")
    try:
        return download_from_hub(name)
    except OSError as err:  # huggingface_hub's HTTP, connection, offline and not-found errors are OSErrors
        errors.append(f"Hugging Face hub {HUB_REPOS[name]}/{HUB_FILE}: {err}")
    raise RuntimeError(
        f"could not fetch the released weights of {name}:\n"
        + "\n".join(errors)
        + "\nCheck the network, or set HF_ENDPOINT to a hub mirror (RES2NET_MIRRORS for the .pth files)."
    )
