"""WebDataset shards (``data.format=wds``): which tar files a split reads, the index of their samples, and the
epoch order that both backends follow.

A shard is a POSIX tar whose members are grouped into samples by key (the member name up to the first dot after the
last slash, as webdataset and DALI split it): an image under one of ``data.wds_image_keys`` (jpg / jpeg / png /
webp), the class index as ASCII under ``data.wds_label_key`` (cls), optionally ``json``. The index of a split holds,
per sample, its shard, the offset and size of its image bytes and its label, so any sample can be read with one
seek; it comes from ``manifest.json`` and the DALI index files that ``scripts/make_shards.py`` writes beside the
shards, or, for shards without them (the Hugging Face hub's), from one pass over the tar headers.

Train order of an epoch (``wds_epoch_order``): a (seed, epoch) permutation of the shards, and inside each shard a
(seed, epoch, shard) permutation of its samples (``data.wds_shuffle_in_shard``; off: in file order, purely
sequential reads). Ranks take contiguous blocks of it (index.train_positions), so a rank reads a run of whole shards
plus at most two partial ones. Val: the shards in the order given, each in file order, cut as index.val_shard cuts a
folder.
"""

import io
import json
import logging
import os
import re
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .imagenet_wnids import IMAGENET1K_WNIDS
from .index import _check_seed

__all__ = [
    "MANIFEST",
    "ShardError",
    "expand_braces",
    "resolve_shards",
    "ShardSet",
    "load_shards",
    "wds_epoch_order",
    "split_key",
    "dali_index_text",
    "write_dali_index",
    "MemberReader",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "res2net-wds/1"
DALI_INDEX_VERSION = "v1.2"
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard that is missing, truncated or not what its manifest says; the message names it."""


def expand_braces(pattern: str) -> list[str]:
    """``train-{0000..0003}.tar`` -> the four names, zero-padded to the width of the first bound (webdataset's
    brace notation; several ranges expand as a product, left to right)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"shard pattern {pattern!r}: the range {{{lo}..{hi}}} is empty (first bound > last)")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(f"{head}{i:0{len(lo)}d}{tail}"))
    return out


def _read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"cannot read the shard manifest {path}: {err}; re-run scripts/make_shards.py") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path} is not a manifest of scripts/make_shards.py (format {manifest.get('format')!r})")
    return manifest


def resolve_shards(spec: Any, split: str, key: str) -> list[str]:
    """The shard paths of ``data.<key>``: a brace pattern or a single .tar path, a list of those, or a folder with a
    manifest.json (its ``split`` shards). URLs and ``pipe:`` commands are refused (local or mounted paths only)."""
    if spec is None:
        raise ValueError(
            f"data.{key} is not set; with data.format=wds pass data.{key}=<folder of scripts/make_shards.py> or a "
            f"pattern such as /data/shards/{split}-{{0000..0127}}.tar"
        )
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError(f"data.{key} is an empty list; give shard paths, a brace pattern or a shard folder")
    paths: list[str] = []
    for item in items:
        item = str(item)
        if "://" in item or item.startswith("pipe:"):
            raise ValueError(
                f"data.{key}={item!r}: URLs and pipe: commands are not supported (shards are read by seeking to "
                "each sample); download or mount the shards and give their local paths"
            )
        if os.path.isdir(item):
            manifest = _read_manifest(item)
            if manifest is None or split not in manifest.get("splits", {}):
                raise FileNotFoundError(
                    f"data.{key}={item!r} is a folder without a {MANIFEST} listing a {split!r} split; give a "
                    f"pattern such as {item}/{split}-{{0000..0009}}.tar, or run scripts/make_shards.py --out {item}"
                )
            paths.extend(os.path.join(item, s["name"]) for s in manifest["splits"][split]["shards"])
        else:
            paths.extend(expand_braces(item))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardError(
            f"shard {missing[0]} does not exist ({len(missing)} of the {len(paths)} shards of data.{key} are "
            "missing); check the path or download / re-make the shards"
        )
    return [os.path.abspath(p) for p in paths]


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the extension starts at the first dot after the last slash."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


@dataclass
class _ShardIndex:
    names: list[str]  # key + '.' + image extension, or the file name its json member holds, per sample
    exts: list[str]  # the image member's extension
    offsets: np.ndarray  # int64, the image bytes' offset in the tar
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64


def _scan_tar(path: str, image_keys: Sequence[str], label_key: str) -> _ShardIndex:
    """One pass over a shard's headers (image bytes skipped by seeking; label members read)."""
    samples: dict[str, dict] = {}
    order: list[str] = []
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not key or key.endswith("/") or os.path.basename(key).startswith("."):
                    continue
                if member.offset_data + member.size > size:
                    raise ShardError(f"shard {path} is truncated: member {member.name} ends past the end of the file")
                entry = samples.get(key)
                if entry is None:
                    entry = samples[key] = {}
                    order.append(key)
                if ext in image_keys and "image" not in entry:
                    entry["image"] = (ext, member.offset_data, member.size)
                elif ext == label_key:
                    entry["label"] = tar.extractfile(member).read()
                elif ext == "json" and member.size < 65536:
                    entry["json"] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"shard {path} is truncated or not a tar file ({err}); re-download or re-make it") from err
    names, exts, offsets, sizes, labels = [], [], [], [], []
    for key in order:
        entry = samples[key]
        if "image" not in entry or "label" not in entry:
            raise ShardError(
                f"shard {path}: sample {key!r} has no {'image' if 'image' not in entry else 'label'} member "
                f"(image keys {list(image_keys)}, label key {label_key!r}; "
                "set data.wds_image_keys / data.wds_label_key)"
            )
        ext, offset, nbytes = entry["image"]
        try:
            label = int(entry["label"].decode().strip())
        except ValueError as err:
            raise ShardError(
                f"shard {path}: sample {key!r} has a label {entry['label'][:20]!r} that is no integer"
            ) from err
        names.append(_json_filename(entry.get("json")) or f"{key}.{ext}")
        exts.append(ext)
        offsets.append(offset)
        sizes.append(nbytes)
        labels.append(label)
    if not names:
        raise ShardError(f"shard {path} holds no samples with an image under {list(image_keys)}")
    return _ShardIndex(names, exts, np.array(offsets, np.int64), np.array(sizes, np.int64), np.array(labels, np.int64))


def _json_filename(raw: bytes | None) -> str | None:
    """The original file name a sample's json member records ('filename', as make_shards.py and the hub's
    ImageNet shards write it), so the sample keeps it (ReaL scoring reads ILSVRC2012_val_<n> from it)."""
    if raw is None:
        return None
    try:
        name = json.loads(raw).get("filename")
    except (ValueError, AttributeError):
        return None
    return os.path.basename(name) if isinstance(name, str) and name.strip() else None


def _read_dali_index(idx_path: str, image_keys: Sequence[str]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(names, image extensions, image offsets, image sizes) from a DALI v1.2 index file (one line per sample: ext
    offset size name, repeated per member)."""
    names, exts, offsets, sizes = [], [], [], []
    with open(idx_path) as f:
        head = f.readline().split()
        for line in f:
            fields = line.split()
            for i in range(0, len(fields), 4):
                if fields[i] in image_keys:
                    names.append(fields[i + 3])
                    exts.append(fields[i])
                    offsets.append(int(fields[i + 1]))
                    sizes.append(int(fields[i + 2]))
                    break
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or int(head[1]) != len(names):
        raise ShardError(f"DALI index {idx_path} is not a {DALI_INDEX_VERSION} index of {head[1:]} samples")
    return names, exts, np.array(offsets, np.int64), np.array(sizes, np.int64)


def _from_manifest(path: str, entry: dict, image_keys: Sequence[str]) -> _ShardIndex:
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ShardError(
            f"shard {path} has {size} bytes, its manifest says {entry['bytes']}: truncated or changed; "
            "re-make it (scripts/make_shards.py resumes) or re-download it"
        )
    names, exts, offsets, sizes = _read_dali_index(os.path.join(os.path.dirname(path), entry["index"]), image_keys)
    labels = np.array(entry["labels"], np.int64)
    if len(names) != entry["samples"] or len(labels) != entry["samples"]:
        raise ShardError(f"shard {path}: its index and manifest disagree on the sample count; re-run make_shards")
    return _ShardIndex(names, exts, offsets, sizes, labels)


@dataclass
class ShardSet:
    """The samples of one split's shards in their file order: ``names`` (``<shard path>/<key>.<ext>``: the shard
    and the key, and a base name like a file's, which ReaL scoring reads), ``labels``, and where each image's bytes
    lie (``shard_of``, ``offsets``, ``sizes``); ``counts`` per shard; ``classes`` (wnids or names)."""

    paths: list[str]
    counts: np.ndarray
    names: np.ndarray
    exts: np.ndarray
    labels: np.ndarray
    shard_of: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def samples(self) -> list[tuple[str, int]]:
        return list(zip(self.names.tolist(), self.labels.tolist()))


def load_shards(paths: Sequence[str], image_keys: Sequence[str], label_key: str) -> ShardSet:
    """The index of ``paths`` (resolve_shards): from the manifest + DALI index of each shard's folder when it lists
    the shard, else by scanning the tar. Classes: the manifest's, else the 1,000 ImageNet-1k wnids."""
    manifests: dict[str, dict] = {}
    parts: list[_ShardIndex] = []
    classes: list[str] | None = None
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in manifests:
            manifests[folder] = _read_manifest(folder) or {}
        manifest = manifests[folder]
        entry = None
        for split in manifest.get("splits", {}).values():
            entry = next((s for s in split["shards"] if s["name"] == os.path.basename(path)), entry)
        if entry is not None:
            parts.append(_from_manifest(path, entry, image_keys))
            classes = classes or manifest["classes"]
        else:
            parts.append(_scan_tar(path, image_keys, label_key))
    classes = list(classes or IMAGENET1K_WNIDS)
    counts = np.array([len(p.names) for p in parts], np.int64)
    labels = np.concatenate([p.labels for p in parts])
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        shard = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
        raise ShardError(
            f"shard {paths[shard]} has a label {int(labels[bad[0]])} outside [0, {len(classes)}) (the classes of "
            f"{'its manifest' if manifests.get(os.path.dirname(paths[shard])) else 'ImageNet-1k'})"
        )
    names = np.array([f"{path}/{n}" for path, p in zip(paths, parts) for n in p.names])
    return ShardSet(
        paths=list(paths),
        counts=counts,
        names=names,
        exts=np.array([e for p in parts for e in p.exts]),
        labels=labels,
        shard_of=np.repeat(np.arange(len(parts)), counts),
        offsets=np.concatenate([p.offsets for p in parts]),
        sizes=np.concatenate([p.sizes for p in parts]),
        classes=classes,
    )


def wds_epoch_order(counts: Sequence[int], seed: int, epoch: int, in_shard: bool = True) -> np.ndarray:
    """Sample indices (into the shards' concatenated file order) of epoch ``epoch``: the shards in a (seed, epoch)
    permutation, each shard's samples in a (seed, epoch, shard) permutation (``in_shard``) or in file order."""
    _check_seed(seed, epoch)
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards = np.random.default_rng([seed, epoch, 1]).permutation(len(counts))
    parts = []
    for s in shards:  # one numpy call per shard (a thousand for ImageNet), not per sample
        inner = np.random.default_rng([seed, epoch, 2, s]).permutation(counts[s]) if in_shard else np.arange(counts[s])
        parts.append(starts[s] + inner)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def dali_index_text(rows: Sequence[Sequence[tuple[str, int, int, str]]]) -> str:
    """A DALI ``fn.readers.webdataset`` index (version v1.2, as DALI's wds2idx writes): a header line with the sample
    count, then per sample its members as ``ext offset size name`` (data offset in bytes) on one line. DALI reads
    the samples in the order listed, wherever they lie in the tar (shards.py relies on it for the epoch order)."""
    lines = [f"{DALI_INDEX_VERSION} {len(rows)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members) for members in rows]
    return "\n".join(lines) + "\n"


def write_dali_index(path: str, rows: Sequence[Sequence[tuple[str, int, int, str]]]) -> None:
    with open(path, "w") as f:
        f.write(dali_index_text(rows))


class MemberReader:
    """Reads a sample's image bytes from its shard with positional reads (os.pread: no shared file offset, so
    threads read at once, each on its own duplicate descriptor); keeps up to ``max_open`` shard files open per
    process (a DataLoader worker opens its own after the fork)."""

    def __init__(self, shards: ShardSet, max_open: int = 16):
        self.shards, self.max_open = shards, max_open
        self._fds: dict[int, int] = {}
        self._pid, self._lock = os.getpid(), threading.Lock()
        self.opened = 0  # shard files opened so far (README "Speed": files opened per epoch)

    def pread(self, idx: int, start: int, n: int) -> bytes:
        """Up to ``n`` bytes of sample ``idx``'s image from byte ``start`` on (fewer at its end)."""
        n = max(0, min(n, int(self.shards.sizes[idx]) - start))
        shard = int(self.shards.shard_of[idx])
        if self._pid != os.getpid():  # a forked worker: its own descriptors and lock
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        with self._lock:  # the cache; the read itself runs unlocked on a duplicate that no eviction closes
            fd = self._fds.pop(shard, None)
            if fd is None:
                if len(self._fds) >= self.max_open:
                    os.close(self._fds.pop(next(iter(self._fds))))
                fd = os.open(self.shards.paths[shard], os.O_RDONLY)
                self.opened += 1
            self._fds[shard] = fd  # most recently used last
            mine = os.dup(fd)
        try:
            data = os.pread(mine, n, int(self.shards.offsets[idx]) + start)
        finally:
            os.close(mine)
        if len(data) != n:
            raise OSError(f"{self.shards.names[idx]}: the shard ends {n - len(data)} bytes early (truncated)")
        return data

    def read(self, idx: int) -> bytes:
        """The image bytes of sample ``idx``; OSError when the shard is shorter than its index says."""
        return self.pread(idx, 0, int(self.shards.sizes[idx]))

    def open(self, idx: int) -> io.BufferedReader:
        """A read-only binary file over sample ``idx``'s image that reads only what is asked (a header: its first
        kilobytes)."""
        return io.BufferedReader(_MemberFile(self, idx), buffer_size=16384)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}


class _MemberFile(io.RawIOBase):
    """The bytes of one tar member as a seekable raw file (MemberReader.open)."""

    def __init__(self, reader: MemberReader, idx: int):
        super().__init__()
        self.reader, self.idx, self.pos, self.size = reader, idx, 0, int(reader.shards.sizes[idx])
        self.name = str(reader.shards.names[idx])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.reader.pread(self.idx, self.pos, min(len(buffer), self.size - self.pos))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos
