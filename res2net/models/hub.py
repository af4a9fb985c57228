"""The Hugging Face hub as the third home of the released weights: ``timm/<name>.in1k``, ``model.safetensors``.

``released_weights(name)`` tries the two public file locations first (``res2net.models.download``) and the hub
when they fail; res2net50d and res2net101d live only on the hub. The hub files go to ``<cache_dir()>/hub`` through
``huggingface_hub`` (imported lazily), which honours ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``; they are
safetensors files, so reading them runs no pickle.

Offline is fast: before asking huggingface_hub (which retries an unreachable endpoint for ~25 s, warning each time)
the endpoint must answer one HTTP request within ``$RES2NET_DOWNLOAD_TIMEOUT`` seconds; with ``HF_HUB_OFFLINE=1``
only the hub cache is used. When every source fails, the error is one line naming each source tried and the ways to
work offline.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from .download import DownloadError, cache_dir, download_checkpoint, download_timeout
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
    endpoint = os.environ.get("HF_ENDPOINT")
    timeout = download_timeout()
    if not _offline():
        _check_reachable(endpoint or _DEFAULT_ENDPOINT, HUB_REPOS[name], timeout)
    path = hf_hub_download(HUB_REPOS[name], HUB_FILE, cache_dir=directory, endpoint=endpoint, etag_timeout=timeout)
    return Path(path)


_DEFAULT_ENDPOINT = "https://huggingface.co"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_reachable(endpoint: str, repo: str, timeout: float) -> None:
    """OSError unless ``endpoint`` answers an HTTP request (any status) within ``timeout`` seconds."""
    request = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models/{repo}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:  # an answer, whatever its status: the hub is there
        return
    except (OSError, ValueError) as err:  # URLError, a timeout, a refused or reset connection, a malformed URL
        reason = getattr(err, "reason", None) or err
        raise OSError(f"no answer from {endpoint} within {timeout:g} s ({reason})") from None


def released_weights(name: str) -> Path:
    """Local file of a variant's released ImageNet weights: the public file locations first, then the hub.

    Raises ValueError for a variant without released weights and RuntimeError naming every source's error when
    none delivers.
    """
    tried = []
    if name in RELEASED:
        try:
            return download_checkpoint(name)
        except DownloadError as err:
            tried += [f"{url}: {why}" for url, why in err.attempts]
            logger.info("the file locations of %s failed; trying the Hugging Face hub (%s)", name, HUB_REPOS[name])
        except RuntimeError as err:
            tried.append(str(err).splitlines()[0])
    elif name not in HUB_REPOS:
        raise ValueError(f"no released weights for {name!r}; released models: {', '.join(sorted(HUB_REPOS))}")
    endpoint = os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT
    try:
        return download_from_hub(name)
    except OSError as err:  # huggingface_hub's HTTP, connection, offline and not-found errors are OSErrors
        why = " ".join(str(err).split())  # huggingface_hub's messages span lines
        tried.append(f"Hugging Face hub {endpoint}/{HUB_REPOS[name]}/{HUB_FILE}: {why}")
    file = RELEASED[name].file if name in RELEASED else HUB_FILE
    raise RuntimeError(
        f"could not fetch the released weights of {name}, tried: {'; '.join(tried)}. To work offline: pass a "
        f"local file instead (e.g. {file} copied into {cache_dir()}), set HF_HUB_OFFLINE=1 to use only the hub "
        "cache, or point RES2NET_MIRRORS=<base url>[,...] (the .pth files) / HF_ENDPOINT (the hub) at a mirror"
    )
