#!/usr/bin/env python
"""Turn the ImageNet-1k (ILSVRC2012) downloads into <out>/{train,val}/<wnid>/*.JPEG.

Two sources:

  official archives (image-net.org):
      python scripts/prepare_imagenet.py --archives DIR --out ROOT
    DIR holds ILSVRC2012_img_train.tar (one inner tar per class), ILSVRC2012_img_val.tar (50,000 flat JPEGs) and
    ILSVRC2012_devkit_t12.tar.gz. The devkit's validation ground truth lists ILSVRC2012_IDs, which are NOT the
    sorted-wnid order; data/meta.mat maps each ID to its wnid.

  Kaggle (imagenet-object-localization-challenge):
      python scripts/prepare_imagenet.py --kaggle DIR --out ROOT [--link hardlink|symlink|copy]
    DIR holds ILSVRC/Data/CLS-LOC/{train/<wnid>,val} and LOC_val_solution.csv (first wnid of each
    PredictionString is the label).

Class names and file names come from the downloads and become paths, so each must be one plain path component (no
'/', '\\', NUL, no '.' / '..', no leading '.', at most 255 bytes) and, by default, an ImageNet wnid (n + 8 digits);
--class-pattern REGEX (matched in full) admits other names for other data sets laid out the same way. A name that
fails is an error naming it and its source, before anything is written for it: nothing is written outside --out.

Idempotent and resumable: a train class is assembled under ROOT/.partial/ and moved into place in one rename, a
val file is written atomically (res2net.files.atomic_write), and whatever already exists in place is skipped. An
interrupted run (Ctrl-C, a truncated download) is finished by running the same command again. At the end the
counts are checked (1,281,167 train, 50,000 val, 1,000 classes by default) and any difference is reported; the exit
status is 1 when they differ.
"""

import argparse
import csv
import io
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from res2net.errors import run_script
from res2net.files import atomic_write, remove_stale_temporaries

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
EXPECTED = {"train": 1_281_167, "val": 50_000, "classes": 1_000}
PARTIAL = ".partial"
WNID_PATTERN = r"n\d{8}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--archives", type=Path, help=f"folder with {TRAIN_TAR}, {VAL_TAR} and {DEVKIT}")
    src.add_argument("--kaggle", type=Path, help="folder with ILSVRC/Data/CLS-LOC and LOC_val_solution.csv")
    p.add_argument("--out", type=Path, required=True, help="output root; gets train/ and val/")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument(
        "--link",
        default="hardlink",
        choices=["hardlink", "symlink", "copy"],
        help="Kaggle only: how files reach the output (hardlink falls back to copy across file systems)",
    )
    p.add_argument("--expected-train", type=int, default=EXPECTED["train"])
    p.add_argument("--expected-val", type=int, default=EXPECTED["val"])
    p.add_argument("--expected-classes", type=int, default=EXPECTED["classes"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument(
        "--class-pattern",
        default=WNID_PATTERN,
        type=re.compile,
        help=f"regular expression every class name must match in full (default {WNID_PATTERN}, ImageNet's wnids); "
        "a name must be one plain path component whatever the pattern",
    )
    return p.parse_args(argv)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; expected {what}")
    return path


# ------------------------------------------------------------------ names from the downloads, checked before use


def plain_component(name: str, what: str, source: object) -> str:
    """``name`` when it is one plain path component (see the module docstring); an error naming it otherwise."""
    if (
        not name
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        raise SystemExit(
            f"error: {what} {name!r} from {source} is not one plain path component; refusing to use it as a path "
            "(nothing was written for it)"
        )
    return name


def class_name(name: str, pattern: re.Pattern, source: object) -> str:
    """``name`` when it can be a class folder: a plain path component that matches ``pattern`` in full."""
    plain_component(name, "class name", source)
    if not pattern.fullmatch(name):
        raise SystemExit(
            f"error: class name {name!r} from {source} does not match {pattern.pattern!r} (ImageNet's wnids are "
            "n + 8 digits); pass --class-pattern REGEX for another data set"
        )
    return name


# ------------------------------------------------------------------ writing helpers (atomic, resumable)


def place_file(src: Path, dst: Path, link: str, copy=shutil.copyfile) -> None:
    """``dst`` as a link to ``src`` or, with ``link='copy'`` or where hard links fail, ``copy(src, dst)``."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link == "symlink":
        dst.symlink_to(src.resolve())
        return
    if link == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system or no hard links there: copy instead
            pass
    copy(src, dst)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is complete or absent (links are created in one step anyway)."""
    with open(src, "rb") as source, atomic_write(dst) as target:
        shutil.copyfileobj(source, target)


def remove_stale_val_temporaries(out: Path) -> None:
    """Delete the temporary files a killed run left in the val class folders."""
    for folder in (out / "val").glob("*/"):
        remove_stale_temporaries(folder)


def fresh_partial_dir(out: Path, split: str, name: str) -> Path:
    """An empty staging folder for one class; leftovers of an interrupted run are removed first."""
    partial = out / PARTIAL / split / name
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit_class(partial: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(partial, final)


# ------------------------------------------------------------------ official archives


def official_train(archives: Path, out: Path, n_classes: int, pattern: re.Pattern, progress: bool) -> None:
    tar_path = require_file(archives / TRAIN_TAR, "the ImageNet train archive (one inner tar per class)")
    with (
        tarfile.open(tar_path, "r:") as outer,
        tqdm(total=n_classes, desc="train classes", unit="class", disable=not progress) as bar,
    ):
        for member in outer:  # streamed: the members of a finished class are skipped by seeking, not read
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            where = f"{tar_path}:{member.name}"
            wnid = class_name(Path(member.name).name[: -len(".tar")], pattern, where)
            if not (out / "train" / wnid).is_dir():
                partial = fresh_partial_dir(out, "train", wnid)
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for image in inner:
                        if image.isfile():
                            name = plain_component(Path(image.name).name, "file name", where)
                            (partial / name).write_bytes(inner.extractfile(image).read())
                commit_class(partial, out / "train" / wnid)
            bar.update()


def devkit_val_wnids(devkit: Path, pattern: re.Pattern) -> list[str]:
    """Wnid of each val image in ILSVRC2012_val_00000001.. order (devkit ground truth mapped through meta.mat)."""
    import scipy.io

    require_file(devkit, "the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz)")
    with tarfile.open(devkit, "r:*") as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for needed in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
            if needed not in files:
                raise SystemExit(f"error: {devkit} has no data/{needed}; is it ILSVRC2012_devkit_t12.tar.gz?")
        meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(files["meta.mat"]).read()), squeeze_me=True)
        truth = tar.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read().decode().split()
    synsets = meta["synsets"]
    where = f"{devkit}:meta.mat"
    id_to_wnid = {
        int(s["ILSVRC2012_ID"]): class_name(str(s["WNID"]), pattern, where)
        for s in synsets
        if int(s["num_children"]) == 0
    }
    return [id_to_wnid[int(t)] for t in truth]


def official_val(archives: Path, devkit: Path, out: Path, pattern: re.Pattern, progress: bool) -> None:
    wnids = devkit_val_wnids(devkit, pattern)
    tar_path = require_file(archives / VAL_TAR, "the ImageNet val archive (50,000 flat JPEGs)")
    remove_stale_val_temporaries(out)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tqdm(tar, desc="val images", unit="img", disable=not progress, total=len(wnids)):
            if not member.isfile():
                continue
            index = int(Path(member.name).stem.rsplit("_", 1)[1]) - 1  # ILSVRC2012_val_00000001 -> 0
            if index >= len(wnids):
                raise SystemExit(f"error: {member.name} has no ground truth in the devkit ({len(wnids)} labels)")
            dst = out / "val" / wnids[index] / plain_component(Path(member.name).name, "file name", tar_path)
            if dst.is_file() and dst.stat().st_size == member.size:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(dst) as f:
                shutil.copyfileobj(tar.extractfile(member), f)


# ------------------------------------------------------------------ Kaggle layout


def kaggle_val_wnids(csv_path: Path, pattern: re.Pattern) -> dict[str, str]:
    """ImageId -> wnid (the first of its PredictionString), every wnid checked before any file is placed."""
    require_file(csv_path, "LOC_val_solution.csv from the Kaggle ImageNet download")
    with open(csv_path, newline="") as f:
        return {
            row["ImageId"]: class_name(row["PredictionString"].split()[0], pattern, f"{csv_path} line {line}")
            for line, row in enumerate(csv.DictReader(f), start=2)
        }


def kaggle_train(kaggle: Path, out: Path, link: str, pattern: re.Pattern, progress: bool) -> None:
    src = kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a folder; expected the Kaggle train folders <wnid>/*.JPEG there")
    classes = sorted(class_name(d.name, pattern, src) for d in src.iterdir() if d.is_dir())
    todo = [c for c in classes if not (out / "train" / c).is_dir()]
    for wnid in tqdm(
        todo,
        desc="train classes",
        unit="class",
        disable=not progress,
        total=len(classes),
        initial=len(classes) - len(todo),
    ):
        partial = fresh_partial_dir(out, "train", wnid)
        for image in sorted((src / wnid).iterdir()):
            if image.is_file():
                place_file(image, partial / image.name, link)
        commit_class(partial, out / "train" / wnid)


def kaggle_val(kaggle: Path, out: Path, link: str, pattern: re.Pattern, progress: bool) -> None:
    labels = kaggle_val_wnids(kaggle / "LOC_val_solution.csv", pattern)
    src = kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a folder; expected the Kaggle val JPEGs there")
    remove_stale_val_temporaries(out)
    for image in tqdm(sorted(src.iterdir()), desc="val images", unit="img", disable=not progress):
        if not image.is_file():
            continue
        if image.stem not in labels:
            raise SystemExit(f"error: {image.name} has no row in LOC_val_solution.csv")
        dst = out / "val" / labels[image.stem] / image.name
        if dst.is_file() and dst.stat().st_size == image.stat().st_size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        place_file(image, dst, link, copy=atomic_copy)


# ------------------------------------------------------------------ count check


def count_split(split_dir: Path) -> tuple[int, int]:
    """(number of class folders, number of files in them); temporary files are not counted."""
    if not split_dir.is_dir():
        return 0, 0
    classes = [d for d in split_dir.iterdir() if d.is_dir()]
    files = sum(1 for d in classes for f in os.scandir(d) if f.is_file() and not f.name.startswith("."))
    return len(classes), files


def check_counts(out: Path, splits: Iterable[str], expected: dict[str, int]) -> list[str]:
    problems = []
    for split in splits:
        n_classes, n_files = count_split(out / split)
        print(f"{split}: {n_files:,} images in {n_classes:,} class folders under {out / split}")
        if n_files != expected[split]:
            problems.append(
                f"{split}: {n_files:,} images, expected {expected[split]:,} ({n_files - expected[split]:+,})"
            )
        if n_classes != expected["classes"]:
            problems.append(f"{split}: {n_classes:,} class folders, expected {expected['classes']:,}")
    return problems


def prepare(args: argparse.Namespace) -> None:
    progress = not args.no_progress
    for split in args.splits:
        if args.archives and split == "train":
            official_train(args.archives, args.out, args.expected_classes, args.class_pattern, progress)
        elif args.archives:
            official_val(args.archives, args.archives / DEVKIT, args.out, args.class_pattern, progress)
        elif split == "train":
            kaggle_train(args.kaggle, args.out, args.link, args.class_pattern, progress)
        else:
            kaggle_val(args.kaggle, args.out, args.link, args.class_pattern, progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        prepare(args)
    except (tarfile.TarError, EOFError) as err:
        print(
            f"error: an archive ended early or is damaged ({err!r}); finished classes and files are kept: "
            "complete the download and run the same command again",
            file=sys.stderr,
        )
        return 2
    shutil.rmtree(args.out / PARTIAL, ignore_errors=True)
    expected = {"train": args.expected_train, "val": args.expected_val, "classes": args.expected_classes}
    problems = check_counts(args.out, args.splits, expected)
    for problem in problems:
        print(f"COUNT MISMATCH {problem}", file=sys.stderr)
    if not problems:
        print("counts OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
