"""Released ImageNet checkpoints: where they live, what they scored, and how to fetch and load them.

Downloads go to ``cache_dir()`` (``$RES2NET_CACHE``, default ``~/.cache/res2net``). Each released file carries the
first 8 hex digits of its sha256 in its name (``res2net50_26w_4s-06e79181.pth``); a download is written to a temporary
file in the cache directory, checked against its Content-Length and that prefix, synced and only then renamed into
place, so a file under its final name is always complete and verified. When a location fails (HTTP error, connection
error, interrupted transfer, wrong hash) the next one is tried. ``$RES2NET_MIRRORS`` (comma-separated base URLs)
replaces the public locations with ``<base>/<file>`` for each base, in order.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

__all__ = [
    "RELEASED",
    "ReleasedCheckpoint",
    "DownloadError",
    "cache_dir",
    "checkpoint_urls",
    "download_checkpoint",
    "extract_state_dict",
    "hash_prefix",
    "load_pretrained",
    "read_checkpoint",
    "released_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "RES2NET_CACHE"
MIRRORS_ENV = "RES2NET_MIRRORS"
_DEFAULT_CACHE = "~/.cache/res2net"
_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema")
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")  # left by DistributedDataParallel and torch.compile
_REPORT_FIRST = 5

# The two public locations serving the same files (timm's GitHub release and the authors' bucket).
_LOCATIONS = (
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-res2net",
    "https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net",
)


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released ImageNet-1k checkpoint: file name (with sha256 prefix), locations, published top-1/top-5 (%)."""

    file: str
    urls: tuple[str, ...]
    top1: float | None
    top5: float | None


def _released(file: str, top1: float, top5: float) -> ReleasedCheckpoint:
    return ReleasedCheckpoint(file, tuple(f"{base}/{file}" for base in _LOCATIONS), top1, top5)


# Published accuracy: timm's results-imagenet.csv (latest table; 50,000 val images, 224 px, crop 0.875, bilinear),
# i.e. measured with the same preprocessing as our evaluator, and one source for every row.
# res2net50_26w_8s: the model card says 79.19 / 94.37 and older timm tables 79.20, but timm's latest table
# re-measured 78.950 / 94.280. We use the latest measurement (same source as the other rows); the evaluator's
# tolerance for this model is wider because of that move.
# res2net50d (80.280) and res2net101d (81.236) have no released file at the two public locations (their weights
# exist only on the Hugging Face hub as safetensors), so they are not in this table.
RELEASED: dict[str, ReleasedCheckpoint] = {
    "res2net50_26w_4s": _released("res2net50_26w_4s-06e79181.pth", 77.994, 93.860),
    "res2net50_26w_6s": _released("res2net50_26w_6s-19041792.pth", 78.586, 94.120),
    "res2net50_26w_8s": _released("res2net50_26w_8s-2c7c9f12.pth", 78.950, 94.280),
    "res2net50_48w_2s": _released("res2net50_48w_2s-afed724a.pth", 77.528, 93.562),
    "res2net50_14w_8s": _released("res2net50_14w_8s-6527dddc.pth", 78.142, 93.852),
    "res2net101_26w_4s": _released("res2net101_26w_4s-02a759a1.pth", 79.192, 94.466),
    "res2next50": _released("res2next50_4s-6ef7e7bf.pth", 78.238, 93.904),
}
_HUB_ONLY = ("res2net50d", "res2net101d")


class DownloadError(RuntimeError):
    """A transfer that ended short or delivered the wrong bytes."""


def released_checkpoint(name: str) -> ReleasedCheckpoint:
    """The release entry of a model name; ValueError naming the released models when there is none."""
    if name in RELEASED:
        return RELEASED[name]
    if name in _HUB_ONLY:
        raise ValueError(
            f"{name} has no released checkpoint file at the public locations (its weights exist only on the "
            f"Hugging Face hub as timm/{name}.in1k: download its model.safetensors and pass the file to "
            f"load_pretrained); pretrained=True works for: {', '.join(sorted(RELEASED))}"
        )
    raise ValueError(f"no released checkpoint for {name!r}; released models: {', '.join(sorted(RELEASED))}")


def cache_dir() -> Path:
    """Where downloads are kept: $RES2NET_CACHE, default ~/.cache/res2net."""
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE).expanduser()


def hash_prefix(file: str) -> str | None:
    """The sha256 prefix in a file name ('res2net50_26w_4s-06e79181.pth' -> '06e79181'), None when it has none."""
    match = _HASH_IN_NAME.search(file)
    return match.group(1) if match else None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mirrors() -> list[str]:
    return [base.strip().rstrip("/") for base in os.environ.get(MIRRORS_ENV, "").split(",") if base.strip()]


def checkpoint_urls(name_or_file: str) -> tuple[str, tuple[str, ...]]:
    """(file name, locations in the order tried) for a released model name or file name.

    $RES2NET_MIRRORS, when set, replaces the public locations (and works for any file name).
    """
    entry = RELEASED.get(name_or_file) or next((e for e in RELEASED.values() if e.file == name_or_file), None)
    file = entry.file if entry else name_or_file
    mirrors = _mirrors()
    if mirrors:
        return file, tuple(f"{base}/{file}" for base in mirrors)
    return file, entry.urls if entry else ()


def download_checkpoint(
    name_or_file: str, urls: Iterable[str] | None = None, cache: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Path of the verified file in the cache, downloading it first if needed.

    ``name_or_file``: a released model name ('res2net50_26w_4s') or a file name. ``urls``: locations to try in order
    (default: ``checkpoint_urls``). A cached file whose hash does not match its name is removed and fetched again;
    a file without a hash in its name is always fetched again.
    Raises RuntimeError listing every location's error when none delivers a good file.
    """
    file, default_urls = checkpoint_urls(name_or_file)
    locations = tuple(urls) if urls is not None else default_urls
    if not file or "/" in file or "\\" in file or file in (".", ".."):
        raise ValueError(f"checkpoint file name must be a plain file name, got {file!r}")
    directory = Path(cache) if cache is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / file
    expected = hash_prefix(file)
    # Only a file whose name carries its hash can be trusted from the cache: another URL may share a plain name.
    if target.is_file() and expected is not None:
        if sha256_file(target).startswith(expected):
            return target
        logger.warning(
            "cached %s does not match the sha256 prefix %s in its name; removing it and downloading again",
            target,
            expected,
        )
        target.unlink()
    if not locations:
        raise ValueError(
            f"no location known for {name_or_file!r}: released models are "
            f"{', '.join(sorted(RELEASED))}; pass urls=... or set {MIRRORS_ENV}=<base url>[,...]"
        )
    if expected is None:
        logger.warning("%s has no sha256 prefix in its name: it is downloaded (again) without a hash check", file)
    errors = []
    for url in locations:
        try:
            _fetch(url, target, expected, progress)
            return target
        except (OSError, http.client.HTTPException, DownloadError) as err:
            errors.append(f"{url}: {err}")
            logger.warning("download of %s failed (%s); trying the next location", url, err)
    raise RuntimeError(
        f"could not download {file} from any location:\n  "
        + "\n  ".join(errors)
        + f"\nCheck the network, set {MIRRORS_ENV}=<base url>[,<base url>...] to a mirror that serves {file}, "
        f"or copy the file into {directory} yourself."
    )


def _fetch(url: str, target: Path, expected: str | None, progress: bool) -> None:
    """Download url to target atomically: temp file in the same directory, size and hash checks, fsync, rename."""
    request = urllib.request.Request(url, headers={"User-Agent": "res2net-recipe"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            digest, received = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f, _progress_bar(total, target.name, progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            if total is not None and received != total:
                raise DownloadError(f"transfer interrupted after {received} of {total} bytes")
            sha256 = digest.hexdigest()
            if expected is not None and not sha256.startswith(expected):
                raise DownloadError(
                    f"sha256 {sha256[:16]}... does not start with {expected} (from the file name): "
                    "the file is corrupt or not the released one; it was discarded"
                )
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress_bar(total: int | None, name: str, enabled: bool):
    from tqdm import tqdm  # imported lazily: res2net.models imports with torch alone

    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(checkpoint: Mapping, use_ema: bool = False, origin: str = "checkpoint") -> dict:
    """The model weights in a checkpoint, with 'module.' / '_orig_mod.' prefixes removed.

    Accepts a plain state_dict or a training checkpoint holding it under 'model', 'state_dict' or
    'state_dict_ema' (first present wins); ``use_ema`` takes 'ema' / 'state_dict_ema' / 'model_ema' instead.
    """
    state = checkpoint
    keys = _EMA_KEYS if use_ema else _WRAPPER_KEYS
    while isinstance(state, Mapping) and not _is_state_dict(state):
        key = next((k for k in keys if isinstance(state.get(k), Mapping)), None)
        if key is None:
            wanted = "EMA weights under " if use_ema else "a state_dict or a dict with weights under "
            raise ValueError(
                f"{origin} holds no model weights: expected {wanted}one of {list(keys)}, "
                f"found keys {sorted(map(str, state))[:10]}"
            )
        state = state[key]
    if not _is_state_dict(state):
        raise ValueError(f"{origin} holds no model weights (a mapping of tensors), got {type(state).__name__}")
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _key_report(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> str | None:
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (files written by older PyTorch lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or shaped):
        return None
    lines = [f"{origin} does not fit this {type(model).__name__}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", shaped)):
        if items:
            more = f", ... ({len(items) - _REPORT_FIRST} more)" if len(items) > _REPORT_FIRST else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:_REPORT_FIRST])}{more}")
    lines.append(
        "Build the model the checkpoint was made for (same name and overrides, e.g. num_classes) "
        "or pass a checkpoint of this architecture."
    )
    return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, trusted: bool = True) -> object:
    """The object in a checkpoint file (on the CPU): .safetensors, or a torch file read tensors-only first.

    ``trusted`` (a local file the user named, e.g. a train.py checkpoint with numpy RNG states) allows falling back
    to the full unpickler when the tensors-only reader refuses the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trusted:
            raise
    # A local training checkpoint may hold objects weights_only refuses (e.g. numpy RNG state).
    logger.info("%s holds more than tensors; loading it with weights_only=False (local file)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_safetensors(path: Path) -> dict:
    # The hub copies (timm/<name>.in1k, the only home of res2net50d / res2net101d weights) are safetensors files.
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"loading {path} needs the safetensors package: .venv/bin/pip install safetensors") from err
    return load_file(path, device="cpu")


def _read_source(source: str | os.PathLike) -> tuple[object, str]:
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        file = Path(urllib.parse.urlparse(text).path).name
        path = download_checkpoint(file, urls=(text,))
        return read_checkpoint(path, trusted=False), f"checkpoint {text}"
    path = Path(text).expanduser()
    if path.is_file():
        return read_checkpoint(path, trusted=True), f"checkpoint {path}"
    if text in RELEASED or text in _HUB_ONLY:
        from .hub import released_weights  # hub.py imports this module

        return read_checkpoint(released_weights(text), trusted=False), f"released checkpoint {text}"
    raise FileNotFoundError(
        f"checkpoint {text!r} not found: it is not a file, not an http(s) URL and not a released "
        f"model name ({', '.join(sorted(RELEASED))})"
    )


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping, use_ema: bool = False) -> None:
    """Load weights into ``model`` (strict) from a URL, a local file (.pth / .pt, or .safetensors), a released model
    name or a checkpoint dict.

    Training checkpoints are unwrapped (see ``extract_state_dict``). A checkpoint that does not fit raises
    RuntimeError listing missing, unexpected and wrongly shaped keys (first few of each, with counts).
    """
    if isinstance(source, Mapping):
        checkpoint, origin = source, "the given checkpoint dict"
    else:
        checkpoint, origin = _read_source(source)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{origin} holds a {type(checkpoint).__name__}, not a state_dict or checkpoint dict")
    state = extract_state_dict(checkpoint, use_ema=use_ema, origin=origin)
    report = _key_report(model, state, origin)
    if report:
        raise RuntimeError(report)
    model.load_state_dict(state, strict=True)
