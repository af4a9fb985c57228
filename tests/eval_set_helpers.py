"""Small folders in the layouts of the evaluation sets, from real photographs, and a tiny 1,000-class checkpoint
(helpers only; the tests live in test_testsets.py and test_eval_suite.py)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_data_helpers import photos

import res2net
from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS

TINY = {"name": "res2net50_26w_4s", "num_classes": None, "layers": [1, 1, 1, 1], "base_width": 4, "scale": 4}
# 3 of the 1,000 classes (ImageNet-1k indices 1, 500, 998), in the subsets' role for -R and -A
SUBSET = (1, 500, 998)


def photo_crop(rng: np.random.Generator, pics: list[np.ndarray]) -> Image.Image:
    """A random window of one of ``pics`` (scikit-image's photographs), resized to 32-48 px."""
    pic = pics[int(rng.integers(len(pics)))]
    h, w = pic.shape[:2]
    ch, cw = int(rng.integers(h // 3, h)), int(rng.integers(w // 3, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    size = (int(rng.integers(32, 49)), int(rng.integers(32, 49)))
    return Image.fromarray(np.ascontiguousarray(pic[y : y + ch, x : x + cw])).resize(size, Image.BILINEAR)


def write_class_folders(
    folder: Path, names: list[str], per_class: int, seed: int, suffix: str = ".jpg", file_name=lambda i: f"img_{i:04d}"
) -> list[tuple[str, str]]:
    """``per_class`` photographs in each folder/<name>/; returns [(path, name)] in writing order."""
    rng, pics = np.random.default_rng(seed), list(photos().values())
    out, i = [], 0
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            i += 1
            path = folder / name / f"{file_name(i)}{suffix}"
            photo_crop(rng, pics).save(path, format="PNG" if suffix == ".png" else "JPEG", quality=90)
            out.append((str(path), name))
    return out


def write_imagenet_val(root: Path, per_class: int = 4, classes: tuple[int, ...] = SUBSET) -> list[tuple[str, str]]:
    """<root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG for the given ImageNet-1k classes (n = 1, 2, ... over all)."""
    names = [IMAGENET1K_WNIDS[c] for c in classes]
    return write_class_folders(
        root / "val", names, per_class, seed=3, suffix=".JPEG", file_name=lambda i: f"ILSVRC2012_val_{i:08d}"
    )


def tiny_1k_checkpoint(path: Path, seed: int = 0) -> Path:
    """A train.py-style checkpoint of a reduced 1,000-class Res2Net (its model config names the architecture)."""
    torch.manual_seed(seed)
    model = res2net.create_model(TINY["name"], num_classes=1000, layers=TINY["layers"], base_width=4)
    # Spread the logits so that some images score differently from others
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    torch.save({"model": model.state_dict(), "config": {"model": TINY}}, path)
    return path


def tiny_1k_model(checkpoint: Path) -> torch.nn.Module:
    model = res2net.create_model(TINY["name"], num_classes=1000, layers=TINY["layers"], base_width=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()
