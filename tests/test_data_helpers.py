"""Small real JPEG folders for the data tests (helpers only; the tests live in test_data*.py)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from res2net.data import build_loader

WNIDS = ("n01440764", "n01443537", "n01484850")


def write_noise_split(root: Path, split: str, n: int, seed: int = 0, wnids: Sequence[str] = WNIDS) -> list[str]:
    """``n`` random-noise JPEGs of random small sizes spread over ``wnids``; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / split / wnids[i % len(wnids)]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(24, 56, size=2)
        path = folder / f"img_{i:04d}.JPEG"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def photos() -> dict[str, np.ndarray]:
    """scikit-image's colour photographs plus non-square / odd-sized crops of them (uint8 HWC)."""
    astronaut, coffee, chelsea, rocket = (
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
    )
    return {
        "astronaut": astronaut,  # 512 x 512
        "coffee": coffee,  # 400 x 600
        "chelsea": chelsea,  # 300 x 451
        "rocket": rocket,  # 427 x 640, portrait after transposing below
        "rocket_portrait": np.ascontiguousarray(rocket.transpose(1, 0, 2)),
        "astronaut_odd": astronaut[13:400, 7:300],  # 387 x 293
        "coffee_odd": coffee[5:216, 31:558],  # 211 x 527
        "chelsea_small": chelsea[40:191, 100:301],  # 151 x 201: upsampled for img_size >= 160
    }


def write_photo_split(
    root: Path, split: str, names: Sequence[str] = None, copies: int = 1, shrink: int = 1
) -> list[tuple[str, str]]:
    """One class folder per photo (sorted names = labels), ``copies`` files each; returns [(path, name)]."""
    all_photos = photos()
    out = []
    for name in names or sorted(all_photos):
        img = all_photos[name][::shrink, ::shrink]
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            path = folder / f"{name}_{c}.JPEG"
            Image.fromarray(np.ascontiguousarray(img)).save(path, quality=92)
            out.append((str(path), name))
    return out


def grey_level_diff(a, b, std: Sequence[float]) -> np.ndarray:
    """Per-image mean absolute difference, in 0-255 grey levels, of two normalized NCHW batches."""
    scale = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1) * 255.0
    diff = np.abs(a.double().cpu().numpy() - b.double().cpu().numpy()) * scale
    return diff.reshape(len(diff), -1).mean(axis=1)


def write_colour_split(root: Path, split: str, n: int, wnids: Sequence[str] = WNIDS) -> list[str]:
    """``n`` uniformly coloured JPEGs, a distinct colour per file, so any crop or flip still tells which file a
    sample came from (see ``colour_ids``); returns the paths in file order."""
    paths = []
    for i in range(n):
        folder = root / split / wnids[i % len(wnids)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:04d}.JPEG"
        Image.new("RGB", (40 + i % 7, 33 + i % 5), _colour(i)).save(path, quality=95)
        paths.append(str(path))
    return paths


def _colour(i: int) -> tuple[int, int, int]:
    return 16 * (i % 16) + 8, 16 * (i // 16) + 8, 128


def colour_ids(images, mean: Sequence[float], std: Sequence[float]) -> list[int]:
    """File numbers (as written by write_colour_split) of a normalized NCHW batch."""
    pixels = images.double().mean(dim=(2, 3)).cpu().numpy() * np.asarray(std) + np.asarray(mean)
    r, g = np.round((pixels[:, 0] * 255 - 8) / 16).astype(int), np.round((pixels[:, 1] * 255 - 8) / 16).astype(int)
    return (g * 16 + r).tolist()


def check_set_epoch_contract(loader) -> None:
    """len() is the batch count; set_epoch validates its arguments; start_batch == len() gives an empty epoch."""
    n = len(loader)
    for epoch, start in ((-1, 0), (0, -1), (0, n + 1)):
        with pytest.raises(
            ValueError,
            match=rf"need epoch >= 0 and 0 <= start_batch <= {n}, "
            rf"got epoch={epoch}, start_batch={start}",
        ):
            loader.set_epoch(epoch, start_batch=start)
    loader.set_epoch(2, start_batch=n)
    assert list(loader) == []
    loader.set_epoch(2, start_batch=n - 1)
    assert len(list(loader)) == 1
    assert len(list(loader)) == n  # a later iteration without set_epoch starts from batch 0 again
    loader.close()


def check_train_statistics(cfg) -> None:
    """A train batch of 16 photo crops (write_photo_split(..., copies=16) of one photograph): shapes, dtypes, values in
    the normalized [0, 1] range, and every crop different from every other one."""
    images, labels = next(iter(build_loader(cfg, "train", seed=1)))
    assert images.shape == (16, 3, cfg.img_size, cfg.img_size) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert (images >= -mean / std - 1e-5).all() and (images <= (1 - mean) / std + 1e-5).all()
    pairwise = (images[:, None] - images[None]).abs().flatten(2).mean(-1)
    assert (pairwise + torch.eye(16) > 0.05).all()
