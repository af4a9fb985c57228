#!/usr/bin/env python
"""Write a train/val image folder as WebDataset shards for data.format=wds.

    python scripts/make_shards.py --root /data/imagenet --out /data/imagenet-wds [--shard-size 1250] [--seed 0]
    python scripts/make_shards.py --out /data/imagenet-wds --check

--root holds train/<class>/* and val/<class>/* (scripts/prepare_imagenet.py's layout, or any ImageFolder). The
output: <out>/train-NNNN.tar and <out>/val-NNNN.tar of --shard-size samples each (the last one shorter), a DALI
index file beside each (<shard>.idx, DALI's wds2idx format v1.2) and <out>/manifest.json (classes; per shard its
samples, bytes, SHA-256 and labels). A sample is <class>/<stem>.{jpg|png|...} (the image's bytes, not re-encoded),
.cls (the class index as text) and .json ({"filename", "class"}); member headers carry no time or owner, so the
same folder and options give byte-identical shards.

Order: val in the folder's sorted order; train shuffled once by --seed, so each shard mixes all classes.
Idempotent and resumable: each shard is written under a temporary name and renamed when complete, finished shards
are kept (checked against the plan), and the manifest is written last; re-running the same command finishes an
interrupted run, and a finished one is left as it is. --check re-reads every shard listed in the manifest (size,
SHA-256, members, labels, DALI index) and exits 1 naming the first one that differs.

Shards made elsewhere (the Hugging Face hub's ImageNet-1k: jpg / cls / json samples) are indexed in place, once, so
that a run does not read every tar's headers at start:

    python scripts/make_shards.py --out /data/in1k-wds --index-train 'imagenet1k-train-{0000..1023}.tar' \\
        --index-val 'imagenet1k-validation-{0000..0063}.tar'

writes a DALI index beside each shard and manifest.json (classes: the 1,000 ImageNet-1k wnids; no SHA-256) into
--out, the folder that holds them.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS
from res2net.data.index import scan_split
from res2net.data.shards import MANIFEST, MANIFEST_FORMAT, ShardError, _scan_tar, dali_index_text, expand_braces
from res2net.errors import run_script
from res2net.files import atomic_write, remove_stale_temporaries

PLAN = ".make_shards_plan.json"  # the plan of an unfinished run, so a resume with other options is refused


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--shard-size", type=int, default=1250, help="samples per shard (default 1250: ~140 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time train shuffle")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--check", action="store_true", help="verify the shards in --out against its manifest")
    p.add_argument("--index-train", help="index existing train shards in --out (a brace pattern of file names)")
    p.add_argument("--index-val", help="index existing val shards in --out (a brace pattern of file names)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = p.parse_args(argv)
    indexing = args.index_train or args.index_val
    if not args.check and not indexing and args.root is None:
        p.error("--root is required unless --check or --index-train / --index-val")
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    return args


def _member_name(path: str, root: Path, split: str) -> tuple[str, str]:
    """(key, ext) of an image file: key <class>/<stem> with dots in the stem made underscores (a key has none),
    ext its lowercased suffix with jpeg written jpg."""
    rel = os.path.relpath(path, root / split)
    wnid, name = os.path.split(rel)
    stem, ext = os.path.splitext(name)
    ext = ext[1:].lower()
    return f"{wnid}/{stem.replace('.', '_')}", "jpg" if ext == "jpeg" else ext


def plan_split(root: Path, split: str, classes, shard_size: int, seed: int):
    """([(path, label, key, ext)] in shard order, classes)."""
    samples, classes = scan_split(str(root), split, classes)
    if split == "train":
        samples = [samples[i] for i in np.random.default_rng([seed, 7]).permutation(len(samples))]
    rows = [(p, label, *_member_name(p, root, split)) for p, label in samples]
    keys = [r[2] for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{root / split}: two images share the key {dup!r} (same name up to its first dot)")
    return rows, classes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member with fixed metadata; returns its data offset."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - len(data) - (-len(data) % tarfile.BLOCKSIZE)


def write_shard(out: Path, name: str, rows, root: Path, split: str, classes) -> dict:
    """Write one shard and its DALI index atomically; returns its manifest entry."""
    index_rows = []
    with atomic_write(out / name) as f:
        digest = _HashingWriter(f)
        with tarfile.open(fileobj=digest, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for path, label, key, ext in rows:
                with open(path, "rb") as img:
                    data = img.read()
                meta = json.dumps({"filename": os.path.relpath(path, root / split), "class": classes[label]}).encode()
                cls = str(label).encode()
                members = []
                for member_ext, payload in ((ext, data), ("cls", cls), ("json", meta)):
                    offset = _add(tar, f"{key}.{member_ext}", payload)
                    members.append((member_ext, offset, len(payload), f"{key}.{member_ext}"))
                index_rows.append(members)
        size = digest.size
        sha = digest.hash.hexdigest()
    with atomic_write(out / _index_name(name)) as f:
        f.write(dali_index_text(index_rows).encode())
    return _entry(name, rows, size, sha)


def _entry(name: str, rows, size: int, sha: str) -> dict:
    return {
        "name": name,
        "index": _index_name(name),
        "samples": len(rows),
        "bytes": size,
        "sha256": sha,
        "labels": [int(r[1]) for r in rows],
    }


def _index_name(name: str) -> str:
    return name[: -len(".tar")] + ".idx"


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through (tarfile writes sequentially)."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make(args) -> int:
    out, root = args.out, args.root
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    manifest = {"format": MANIFEST_FORMAT, "seed": args.seed, "shard_size": args.shard_size, "splits": {}}
    plans, classes = {}, None
    train_classes = None
    if (root / "train").is_dir():
        train_classes = scan_split(str(root), "train")[1]
    for split in args.splits:
        rows, classes = plan_split(root, split, train_classes, args.shard_size, args.seed)
        plans[split] = rows
    manifest["classes"] = list(classes)
    fingerprint = hashlib.sha256(
        json.dumps({s: [(r[2], r[1]) for r in rows] for s, rows in plans.items()} | {"size": args.shard_size}).encode()
    ).hexdigest()
    plan_file = out / PLAN
    if plan_file.exists() and json.loads(plan_file.read_text())["fingerprint"] != fingerprint:
        raise ValueError(
            f"{out} holds an unfinished run of make_shards.py with another folder, seed, split or --shard-size; "
            "re-run that command to finish it, or write to an empty --out"
        )
    old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else None
    if old is not None and old.get("fingerprint") == fingerprint:
        print(f"{out / MANIFEST} is up to date ({sum(s['samples'] for s in old['splits'].values())} samples)")
        return 0
    if old is not None and not plan_file.exists():
        raise ValueError(
            f"{out} holds shards made from another folder or with other options (its {MANIFEST} differs); "
            "write to an empty --out, or delete the old shards first"
        )
    plan_file.write_text(json.dumps({"fingerprint": fingerprint}))
    total = sum(len(rows) for rows in plans.values())
    bar = tqdm(total=total, unit="img", disable=args.no_progress, desc="shards")
    for split, rows in plans.items():
        entries = []
        for k, lo in enumerate(range(0, len(rows), args.shard_size)):
            chunk, name = rows[lo : lo + args.shard_size], f"{split}-{k:04d}.tar"
            done = out / name
            if done.exists() and (out / _index_name(name)).exists():  # finished by an interrupted run of this plan
                entries.append(_entry(name, chunk, done.stat().st_size, _sha256(done)))
            else:
                entries.append(write_shard(out, name, chunk, root, split, classes))
            bar.update(len(chunk))
        manifest["splits"][split] = {"samples": len(rows), "shards": entries}
    bar.close()
    manifest["fingerprint"] = fingerprint
    with atomic_write(out / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    plan_file.unlink()
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    return 0


def check(out: Path, no_progress: bool) -> int:
    path = out / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; make the shards first (scripts/make_shards.py --root ...)")
    manifest = json.loads(path.read_text())
    shards = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    for _split, entry in tqdm(shards, disable=no_progress, desc="check"):
        shard = out / entry["name"]
        if not shard.exists():
            raise ShardError(f"shard {shard} is missing; re-run scripts/make_shards.py with the same options")
        sha_differs = entry["sha256"] is not None and _sha256(shard) != entry["sha256"]  # None: indexed in place
        if shard.stat().st_size != entry["bytes"] or sha_differs:
            raise ShardError(f"shard {shard} differs from the manifest (size or SHA-256): truncated or changed")
        index = _scan_tar(str(shard), ["jpg", "jpeg", "png", "webp", "bmp"], "cls")
        if index.labels.tolist() != entry["labels"]:
            raise ShardError(f"shard {shard}: its labels differ from the manifest's")
        with open(out / entry["index"]) as f:
            lines = f.read().split("\n")
        offsets = [int(line.split()[1]) for line in lines[1:] if line]
        if lines[0] != f"v1.2 {entry['samples']}" or offsets != index.offsets.tolist():
            raise ShardError(f"DALI index {out / entry['index']} does not match shard {shard}")
    counts = {split: info["samples"] for split, info in manifest["splits"].items()}
    print(f"ok: {len(shards)} shards, {counts}, {len(manifest['classes'])} classes")
    return 0


def index_existing(args) -> int:
    """manifest.json and DALI indexes for shards already in --out (read once, headers and labels)."""
    out = args.out
    if (out / MANIFEST).exists():
        raise ValueError(f"{out / MANIFEST} exists already; remove it to index the shards again")
    manifest = {"format": MANIFEST_FORMAT, "classes": list(IMAGENET1K_WNIDS), "indexed": True, "splits": {}}
    for split, pattern in (("train", args.index_train), ("val", args.index_val)):
        if not pattern:
            continue
        names = expand_braces(pattern)
        if any(os.sep in name for name in names):
            raise ValueError(f"--index-{split} {pattern!r}: give file names inside --out {out}, not paths")
        entries = []
        for name in tqdm(names, disable=args.no_progress, desc=f"index {split}"):
            shard = out / name
            if not shard.is_file():
                raise ShardError(f"shard {shard} does not exist; check --index-{split} and --out")
            found = _scan_tar(str(shard), ["jpg", "jpeg", "png", "webp"], "cls")
            rows = [
                [(ext, int(off), int(size), member.replace(" ", "_"))]
                for member, ext, off, size in zip(found.names, found.exts, found.offsets, found.sizes)
            ]
            with atomic_write(out / _index_name(name)) as f:
                f.write(dali_index_text(rows).encode())
            entries.append({**_entry(name, [(None, int(x)) for x in found.labels], shard.stat().st_size, None)})
        manifest["splits"][split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    with atomic_write(out / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards indexed")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return check(args.out, args.no_progress)
    if args.index_train or args.index_val:
        return index_existing(args)
    return make(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
