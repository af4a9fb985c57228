"""The demo data set: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an ImageFolder of JPEGs.

`make demo` trains on it with the real pipeline. The split is fixed and stratified: in each class, in the order
scikit-learn ships the images, every `val_every`-th image (the 0th, 5th, ...) goes to val/, the rest to train/.
Writing is idempotent: a finished folder carries a manifest of the parameters it was written with and is left alone
when they match; otherwise it is rebuilt in a temporary folder and swapped in, so an interrupted run leaves no
half-written data set behind.

    python -m res2net.data.demo [--root data/demo] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_ROOT", "make_demo_dataset"]

DEFAULT_ROOT = Path("data/demo")
MANIFEST = "demo_manifest.json"
# scikit-learn stores digit pixels as ink intensities 0..16.
_MAX_INK = 16


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is pinned in requirements-dev.txt
        raise ImportError(
            "the demo data set needs scikit-learn (`make install` installs it from requirements-dev.txt)"
        ) from e
    digits = load_digits()
    return digits.images, digits.target


def _to_jpeg_image(pixels: np.ndarray, size: int) -> Image.Image:
    grey = Image.fromarray(np.round(pixels * (255 / _MAX_INK)).astype(np.uint8))
    return grey.resize((size, size), Image.BICUBIC).convert("RGB")


def _write(
    root: Path, images: np.ndarray, targets: np.ndarray, size: int, val_every: int, per_class: int | None
) -> dict:
    counts = {"train": 0, "val": 0}
    for label in range(10):
        members = np.flatnonzero(targets == label)
        if per_class is not None:
            members = members[:per_class]
        for j, index in enumerate(members):
            split = "val" if j % val_every == 0 else "train"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            _to_jpeg_image(images[index], size).save(folder / f"{index:04d}.jpg", quality=95)
            counts[split] += 1
    return counts


def make_demo_dataset(
    root: str | Path = DEFAULT_ROOT, *, size: int = 32, val_every: int = 5, per_class: int | None = None
) -> Path:
    """Write (or reuse) the digits ImageFolder under `root` (root/train/<digit>/*.jpg, root/val/<digit>/*.jpg).

    size: output side in pixels; val_every: 1 in val_every images of each class goes to val; per_class: keep only the
    first images of each class (for quick tests). Returns the root.
    """
    if size < 8:
        raise ValueError(f"size={size}: the digits are 8x8, choose size >= 8 (the demo uses 32)")
    if val_every < 2:
        raise ValueError(f"val_every={val_every}: must be >= 2 so both splits get images")
    if per_class is not None and per_class < val_every:
        raise ValueError(f"per_class={per_class}: must be >= val_every={val_every} so every class has train images")
    root = Path(root)
    params = {"source": "sklearn.datasets.load_digits", "size": size, "val_every": val_every, "per_class": per_class}
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return root
    images, targets = _digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        counts = _write(staging, images, targets, size, val_every, per_class)
        (staging / MANIFEST).write_text(json.dumps({"params": params, "counts": counts}, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="output folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    root = make_demo_dataset(args.root, size=args.size)
    counts = json.loads((root / MANIFEST).read_text())["counts"]
    print(f"demo data set: {root} ({counts['train']} train / {counts['val']} val images, 10 classes)")


if __name__ == "__main__":
    main()
