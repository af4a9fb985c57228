"""Fetching the released checkpoints into the cache, each verified against the sha256 prefix in its file name.

The cache is ``$RES2NET_CACHE`` (default ``~/.cache/res2net``). ``$RES2NET_MIRRORS`` (comma-separated base URLs)
replaces the public locations of ``res2net.models.variants``; each failing location falls through to the next.
``$RES2NET_DOWNLOAD_TIMEOUT`` (seconds, default 10) bounds each wait on a location (connecting, or the next bytes),
so a location that cannot be reached, or accepts and never answers, fails in seconds. Reading a fetched file is
``res2net.models.pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import torch

from res2net.files import fsync_dir, temporary_path

from .pretrained import truncated_archive
from .variants import RELEASED

__all__ = [
    "cache_dir",
    "checkpoint_urls",
    "DownloadError",
    "download_checkpoint",
    "download_timeout",
    "hash_prefix",
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
        if expected is None and truncated_archive(tmp):
            raise RuntimeError("transfer interrupted: the zip archive (torch.save format) lacks its end record")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
