#!/usr/bin/env python
"""Find the image files that would trouble training or evaluation, in parallel, and optionally fix them.

    python scripts/check_dataset.py ROOT/train [ROOT/val ...] [--workers N] [--json report.json] [--fix]

Reports, by path: zero-byte files, unreadable files (permissions, I/O errors, symlink loops), images over PIL's
decompression-bomb limit (too_large: more than 2 * PIL.Image.MAX_IMAGE_PIXELS, which both loaders refuse to decode),
undecodable files (truncated or garbage), files that are not JPEG despite their .JPEG/.jpg name (ImageNet train has
a PNG), CMYK JPEGs (22 in ImageNet train) and grayscale JPEGs. Hidden files and folders are skipped, as the loaders
skip them. The last three decode with PIL but not everywhere else (DALI's decoders, other
tools) and give non-RGB input.

--fix first writes the list of what it will change (--changes, default next to the first folder), copies each file
it changes to a backup folder (--backup-dir), then re-encodes the convertible ones (not JPEG, CMYK, grayscale) in
place as RGB JPEG (quality --quality); every file it writes is complete or untouched (res2net.files.atomic_write).
Nothing is deleted: zero-byte, unreadable, too large and undecodable files are left where they are and stay in the
report.
Exit status 0 when no problem remains, else 1.
"""

import argparse
import io
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from res2net.errors import run_script
from res2net.files import atomic_write

# The files the loaders read: res2net.data.index.IMG_EXTENSIONS (a test keeps them equal), not imported because
# res2net.data imports torch.
IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

JPEG_NAMES = (".jpeg", ".jpg")
# Most serious first: a file gets the first category that applies.
CATEGORIES = ("zero_byte", "unreadable", "too_large", "undecodable", "not_jpeg", "cmyk", "grayscale")
CONVERTIBLE = ("not_jpeg", "cmyk", "grayscale")
GRAYSCALE_MODES = ("L", "LA", "1", "I", "I;16", "F")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="folders (scanned recursively) or files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--fix", action="store_true", help="re-encode convertible files as RGB JPEG (see above)")
    p.add_argument("--changes", type=Path, help="--fix: the change list (default <first path>.changes.txt)")
    p.add_argument("--backup-dir", type=Path, help="--fix: originals go here (default <first path>.backup)")
    p.add_argument("--quality", type=int, default=95, help="--fix: JPEG quality of re-encoded files")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def image_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden: the loaders skip them too
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                        yield Path(folder) / name
        else:
            raise SystemExit(f"error: {path} is neither a file nor a folder")


def check_file(path: Path) -> tuple[str, str | None, str]:
    """(path, category or None when fine, detail)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return str(path), "unreadable", repr(err)
    if not data:
        return str(path), "zero_byte", "0 bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode = img.format, img.mode
    except Image.DecompressionBombError as err:  # refused from the header alone: nothing was decoded
        return str(path), "too_large", str(err)
    except Exception as err:  # PIL raises many types for broken files
        return str(path), "undecodable", repr(err)
    if path.suffix.lower() in JPEG_NAMES and fmt != "JPEG":
        return str(path), "not_jpeg", f"{fmt} content, mode {mode}"
    if mode == "CMYK":
        return str(path), "cmyk", f"{fmt} {mode}"
    if mode in GRAYSCALE_MODES:
        return str(path), "grayscale", f"{fmt} {mode}"
    return str(path), None, ""


def scan(paths: list[Path], workers: int, progress: bool) -> list[tuple[str, str, str]]:
    files = list(image_files(paths))
    problems = []
    with Pool(max(1, workers)) as pool:
        results = pool.imap_unordered(check_file, files, chunksize=64)
        for path, category, detail in tqdm(
            results, total=len(files), desc="checking", unit="img", disable=not progress
        ):
            if category:
                problems.append((path, category, detail))
    print(f"checked {len(files):,} files")
    return sorted(problems, key=lambda p: (CATEGORIES.index(p[1]), p[0]))


def print_report(problems: list[tuple[str, str, str]]) -> None:
    counts = Counter(category for _, category, _ in problems)
    for category in CATEGORIES:
        print(f"{category:12s} {counts.get(category, 0):8,d}")
    for path, category, detail in problems:
        print(f"{category}\t{path}\t{detail}")


def fix(problems, changes: Path, backup_dir: Path, roots: list[Path], quality: int) -> list[str]:
    """Re-encode convertible files after writing the change list; returns the paths changed."""
    todo = [(p, c, d) for p, c, d in problems if c in CONVERTIBLE]
    lines = []
    for path, category, detail in problems:
        action = "re-encode as RGB JPEG" if category in CONVERTIBLE else "left as is (not convertible)"
        lines.append(f"{path}\t{category}\t{detail}\t{action}\n")
    with atomic_write(changes) as f:
        f.write("".join(lines).encode())
    print(f"wrote the change list to {changes} ({len(todo)} files to re-encode; originals go to {backup_dir})")
    fixed = []
    for path, _, _ in todo:
        src = Path(path)
        backup = backup_dir / relative_to_roots(src, roots)
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, backup)
        with Image.open(src) as img:
            rgb = img.convert("RGB")
        with atomic_write(src) as f:
            rgb.save(f, "JPEG", quality=quality)
        fixed.append(path)
    return fixed


def relative_to_roots(path: Path, roots: list[Path]) -> Path:
    for root in roots:
        try:
            return Path(root.resolve().name) / path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
    return Path(path.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = scan(args.paths, args.workers, not args.no_progress)
    print_report(problems)
    if args.fix and problems:
        first = Path(str(args.paths[0]).rstrip("/"))
        changes = args.changes or first.with_name(first.name + ".changes.txt")
        backup_dir = args.backup_dir or first.with_name(first.name + ".backup")
        fixed = fix(problems, changes, backup_dir, args.paths, args.quality)
        recheck = {path: category for path, category, _ in map(check_file, map(Path, fixed)) if category}
        if recheck:
            print(f"still wrong after re-encoding: {recheck}", file=sys.stderr)
        print(f"re-encoded {len(fixed) - len(recheck)} files")
        problems = [p for p in problems if p[0] not in fixed or p[0] in recheck]
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps([{"path": p, "problem": c, "detail": d} for p, c, d in problems], indent=1).encode())
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
