"""Checkpoint files: fetch the released ones into the cache (verified against the sha256 prefix in their names),
read any of them tensors-only, and load a state_dict into a model with a report of the keys that do not fit
(``res2net.models.loading`` turns a spec into a model with these).

The cache is ``$RES2NET_CACHE`` (default ``~/.cache/res2net``). ``$RES2NET_MIRRORS`` (comma-separated base URLs)
replaces the public locations of ``res2net.models.variants``; each failing location falls through to the next.
``$RES2NET_DOWNLOAD_TIMEOUT`` (seconds, default 10) bounds each wait on a location (connecting, or the next bytes),
so a location that cannot be reached, or accepts and never answers, fails in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import pickle
import pickletools
import re
import socket
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from res2net.errors import CheckpointError, UnsafeCheckpointError
from res2net.files import fsync_dir, temporary_path

from .variants import RELEASED

__all__ = [
    "cache_dir",
    "checkpoint_urls",
    "DownloadError",
    "download_checkpoint",
    "download_timeout",
    "extract_state_dict",
    "hash_prefix",
    "load_weights",
    "read_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "RES2NET_CACHE"
MIRRORS_ENV = "RES2NET_MIRRORS"
TIMEOUT_ENV = "RES2NET_DOWNLOAD_TIMEOUT"
_DEFAULT_TIMEOUT = 10.0
_DEFAULT_CACHE = "~/.cache/res2net"
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema")
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")  # left by DistributedDataParallel and torch.compile
_REPORT_FIRST = 5


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


class DownloadError(RuntimeError):
    """No location delivered a file; ``attempts`` holds (location, why it failed) in the order tried."""

    def __init__(self, message: str, attempts: list[tuple[str, str]]):
        super().__init__(message)
        self.attempts = attempts


def download_timeout() -> float:
    """Seconds to wait for a location to connect or send its next bytes (``$RES2NET_DOWNLOAD_TIMEOUT``)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else _DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0 (default {_DEFAULT_TIMEOUT:g})")
    return seconds


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub opens its connection without a timeout: give the sockets opened inside the block one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


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
    attempts = []
    timeout = download_timeout()
    for url in locations:
        try:
            with _socket_timeout(timeout):
                _fetch(url, target, expected, progress)
            return target
        except (OSError, http.client.HTTPException, RuntimeError) as err:  # torch.hub: RuntimeError on a bad hash
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            attempts.append((url, why))
            logger.info("download of %s failed (%s); trying the next location", url, why)
    raise DownloadError(
        f"could not download {file}: "
        + "; ".join(f"{url}: {why}" for url, why in attempts)
        + f". Offline or behind a firewall: copy {file} into {directory}, or set {MIRRORS_ENV}=<base url>[,...] "
        "to a mirror that serves it",
        attempts,
    )


def _fetch(url: str, target: Path, expected: str | None, progress: bool) -> None:
    """Download url into a hidden sibling of target (torch.hub checks the sha256 prefix), then fsync and rename."""
    tmp = temporary_path(target)
    try:
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=expected, progress=progress)
        # torch.hub ignores Content-Length; without a hash only a torch.save archive's missing end record shows a
        # transfer that stopped early.
        if expected is None and _truncated_archive(tmp):
            raise RuntimeError("transfer interrupted: the zip archive (torch.save format) lacks its end record")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def _truncated_archive(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC and not zipfile.is_zipfile(path)


def _damaged_member(path: Path) -> str | None:
    """What is wrong with a torch.save zip archive whose members fail their CRC-32 check (every member is read
    once: about as long as loading it), or None when they all pass or the file is not a zip archive (older torch
    files have no checksums)."""
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, UnicodeDecodeError) as err:  # damaged header
        return f"its zip structure is broken ({_first_line(err)})"
    return None if bad is None else f"member {bad} fails its CRC-32 check"


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
            if use_ema and any(k in state for k in keys):  # train.py writes ema: None when the EMA was off
                raise CheckpointError(
                    f"{origin} has no EMA weights: its run trained without them (trainer.ema_decay=0); evaluate "
                    f"its weights without use_ema=true"
                )
            wanted = "EMA weights under " if use_ema else "a state_dict or a dict with weights under "
            found = sorted(str(k) for k, v in state.items() if v is not None)
            raise CheckpointError(
                f"{origin} holds no model weights: expected {wanted}one of {list(keys)}, found keys {found[:10]}"
            )
        state = state[key]
    if not _is_state_dict(state):
        raise CheckpointError(f"{origin} holds no model weights (a mapping of tensors), got {type(state).__name__}")
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


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> object:
    """The object in a checkpoint file (on the CPU): .safetensors, or a torch file read tensors-only.

    Raises ``CheckpointError`` naming the file and what is wrong with it (a directory, empty, a truncated archive,
    not a checkpoint at all) and its subclass ``UnsafeCheckpointError`` for a file that only Python's full unpickler
    reads, which can run arbitrary code while loading. ``trusted=True`` reads such a file anyway: only for a file
    whose origin you trust. FileNotFoundError when there is no such path.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if _truncated_archive(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated: the zip archive torch.save writes lacks its end record (an interrupted "
            "download, copy or write); fetch or copy the file again"
        )
    damaged = _damaged_member(path)
    if damaged:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {damaged} (bytes changed on disk or in a copy); fetch or copy it again, "
            "or use an earlier checkpoint (a train.py run keeps checkpoints/epoch_*.pth)"
        )
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise beside the error said below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a damaged file as UnpicklingError, RuntimeError, EOFError, IndexError...
        if not _pickled(path):
            raise CheckpointError(
                f"checkpoint {path} is not a PyTorch checkpoint: neither a torch.save archive nor a pickle"
            ) from None
        if not isinstance(err, pickle.UnpicklingError):
            raise CheckpointError(
                f"checkpoint {path} is damaged or not a PyTorch checkpoint: {_first_line(err)}"
            ) from None
        if not trusted:
            raise UnsafeCheckpointError(
                f"checkpoint {path} was not loaded: it holds objects other than tensors and plain containers "
                f"({_refusal(err)}), and reading it needs Python's full unpickler, which can run arbitrary code "
                "while loading.\nIf you trust the file's origin: res2net.load_pretrained(model, source, "
                "trusted=True), or evaluate.py trust_checkpoint=true"
            ) from None
    logger.warning("%s holds more than tensors; loading it with Python's full unpickler (trusted=True)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a trusted file can still be damaged
        raise CheckpointError(f"checkpoint {path} could not be unpickled: {_first_line(err)}") from err


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file; name a file in it (a train.py run directory "
            "keeps checkpoints/last.pth and checkpoints/best.pth)"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): an interrupted download, copy or write; fetch or copy it again"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _refusal(err: pickle.UnpicklingError) -> str:
    """What the tensors-only reader refused, from torch's message: 'posix.system', 'pickle opcode 149', ..."""
    text = str(err)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it refers to {found.group(1)}"
    if found := re.search(r"Unsupported operand (\d+)", text):
        return f"pickle opcode {found.group(1)}"
    return "refused by torch.load(weights_only=True)"


def _pickled(path: Path) -> bool:
    """Whether the file is a pickle torch.load reads, parsed opcode by opcode with nothing executed: a zip archive
    whose data.pkl is one well-formed pickle, or a file whose first pickle is torch's legacy magic number or calls a
    global (what the tensors-only reader refuses). Tells a refused file apart from one that is not a checkpoint at
    all: random bytes now and then parse as a short pickle of plain data, so a parse alone does not say "pickle"."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if member is None:
                    return False
                with archive.open(member) as f:
                    return _opcodes(f) is not None and not f.read(1)
        with open(path, "rb") as f:
            ops = _opcodes(f) or []
        return any(arg == torch.serialization.MAGIC_NUMBER or name in _CALLS for name, arg in ops)
    except Exception:  # a damaged archive: zipfile raises BadZipFile, UnicodeDecodeError, EOFError, ...
        return False


_CALLS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def _opcodes(stream) -> list[tuple[str, object]] | None:
    """(name, argument) of one pickle's opcodes, or None where the stream does not hold a well-formed pickle."""
    try:
        return [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    except Exception:  # pickletools raises ValueError and others for anything that is not a pickle
        return None


def _load_safetensors(path: Path) -> dict:
    # The hub copies (timm/<name>.in1k, the only home of res2net50d / res2net101d weights) are safetensors files.
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"loading {path} needs the safetensors package: .venv/bin/pip install safetensors") from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises SafetensorError (and others) for a damaged header or data
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {_first_line(err)}") from None


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str = "the given state_dict") -> None:
    """``model.load_state_dict(state, strict=True)``, or CheckpointError naming ``origin`` and listing missing,
    unexpected and wrongly shaped keys."""
    report = _key_report(model, state, origin)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state, strict=True)
