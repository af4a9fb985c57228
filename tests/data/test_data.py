"""Index, sharding, config, torchvision and synthetic backends (real JPEG files, real DataLoader workers)."""

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from omegaconf import OmegaConf
from PIL import Image
from test_data_helpers import (
    WNIDS,
    check_set_epoch_contract,
    check_train_statistics,
    write_noise_split,
    write_photo_split,
)

from res2net.data import DataConfig, as_data_config, build_loader, scan_split
from res2net.data.index import epoch_batches, epoch_permutation, train_positions, train_shard, val_shard
from res2net.data.transforms import (
    DRAW_FLIP,
    augmentation_draws,
    center_crop_offset,
    random_resized_crop_box,
    sample_uniforms,
    val_resize_size,
    val_resized_shape,
)

STD = DataConfig().std


def tv_cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), backend="torchvision", batch_size=8, num_workers=0, img_size=32)
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------- index and labels


def test_scan_split_labels_are_sorted_wnid_positions(tmp_path):
    write_noise_split(tmp_path, "train", 9, wnids=("n03", "n01", "n02"))
    samples, classes = scan_split(str(tmp_path), "train")
    assert classes == ["n01", "n02", "n03"]
    assert len(samples) == 9
    for path, label in samples:
        assert Path(path).parent.name == classes[label]
    assert [p for p, _ in samples] == sorted(p for p, _ in samples)


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("no_root", "is not a directory"),
        ("no_split", "does not exist"),
        ("no_classes", "no class sub-folders"),
        ("empty_class", "holds no images"),
    ],
)
def test_scan_split_errors_name_the_path(tmp_path, layout, expected):
    root = tmp_path / "data"
    bad_path = root
    if layout != "no_root":
        write_noise_split(root, "train", 3)
        bad_path = root / "val"
    if layout in ("no_classes", "empty_class"):
        (root / "val").mkdir()
    if layout == "empty_class":
        bad_path = root / "val" / "n09999999"
        bad_path.mkdir()
        (bad_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=expected) as info:
        scan_split(str(root), "val")
    assert str(bad_path) in str(info.value)


def test_unset_root_names_the_key():
    with pytest.raises(ValueError, match=r"data\.root is not set; pass data\.root="):
        scan_split(None, "train")


def test_val_uses_train_class_mapping_when_a_class_is_missing(tmp_path):
    write_noise_split(tmp_path, "train", 6, wnids=("n01", "n02", "n03"))
    write_noise_split(tmp_path, "val", 4, wnids=("n01", "n03"))
    loader = build_loader(tv_cfg(tmp_path, batch_size=4), "val")
    assert loader.classes == ["n01", "n02", "n03"]
    assert sorted(set(loader.targets)) == [0, 2]


# ---------------------------------------------------------------- order and sharding helpers


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_permutation(1000, seed=3, epoch=5)
    assert np.array_equal(a, epoch_permutation(1000, seed=3, epoch=5))
    assert sorted(a) == list(range(1000))
    assert not np.array_equal(a, epoch_permutation(1000, seed=3, epoch=6))
    assert not np.array_equal(a, epoch_permutation(1000, seed=4, epoch=5))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_train_shards_are_disjoint_and_equal(world_size):
    n = 101
    parts = [train_positions(n, r, world_size, seed=0, epoch=2)[0] for r in range(world_size)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // world_size
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == len(joined)
    assert [train_shard(n, r, world_size) for r in range(world_size)][-1][1] == (n // world_size) * world_size


@pytest.mark.parametrize("n", [0, 1, 5, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_val_shards_cover_everything_once(n, world_size):
    bounds = [val_shard(n, r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, batch_size", [(101, 8), (50, 7), (16, 16), (5, 1)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_epoch_batches_of_every_rank(n, batch_size, world_size):
    """Train: floor(floor(n / world_size) / batch_size) whole batches on every rank; val: every sample in exactly
    one batch of one rank; a resumed epoch yields exactly the batches after start_batch."""
    if n // world_size < batch_size:
        with pytest.raises(
            ValueError,
            match=rf"rank 0 of {world_size} gets {n // world_size} of the {n} training "
            rf"samples, fewer than data\.batch_size={batch_size}",
        ):
            epoch_batches(n, batch_size, 0, world_size, train=True)
    else:
        for rank in range(world_size):
            train = epoch_batches(n, batch_size, rank, world_size, train=True)
            assert len(train.remaining(0)) == train.num_batches == n // world_size // batch_size
            assert train.num_samples == train.num_batches * batch_size <= train.stop - train.start
            assert [train.bounds(b) for b in train.remaining(0)] == [
                (b * batch_size, (b + 1) * batch_size) for b in range(train.num_batches)
            ]
    seen = []
    for rank in range(world_size):
        val = epoch_batches(n, batch_size, rank, world_size, train=False)
        rows = [i for b in val.remaining(0) for i in range(*val.bounds(b))]
        assert rows == list(range(val.num_samples)) and val.num_batches == -(-val.num_samples // batch_size)
        assert all(0 < val.bounds(b)[1] - val.bounds(b)[0] <= batch_size for b in val.remaining(0))
        assert list(val.remaining(val.num_batches - 1)) == [val.num_batches - 1] and not val.remaining(val.num_batches)
        seen += [val.start + i for i in rows]
    assert seen == list(range(n))


def test_val_geometry_matches_torchvision():
    assert val_resize_size(224, 0.875) == 256 and val_resize_size(288, 1.0) == 288
    for h, w in [(427, 640), (640, 427), (300, 451), (387, 293), (500, 500), (211, 527)]:
        img = Image.new("RGB", (w, h))
        resized = T.Resize(256)(img)
        assert val_resized_shape(h, w, 256) == (resized.height, resized.width)
        for crop in (224, 97):
            top, left = center_crop_offset(resized.height, crop), center_crop_offset(resized.width, crop)
            marked = Image.new("L", resized.size)
            marked.putpixel((left, top), 255)
            assert np.asarray(F.center_crop(marked, [crop, crop]))[0, 0] == 255


# ---------------------------------------------------------------- config


def test_config_from_omegaconf_and_errors(noise_root):
    node = OmegaConf.structured(tv_cfg(noise_root))
    assert as_data_config(node) == tv_cfg(noise_root)
    assert as_data_config(OmegaConf.create({"root": "x", "batch_size": 3})).batch_size == 3
    with pytest.raises(ValueError, match="unknown data config keys.*batchsize"):
        as_data_config({"batchsize": 3})
    with pytest.raises(ValueError, match="backend='pil'.*one of"):
        build_loader(tv_cfg(noise_root, backend="pil"), "train")
    with pytest.raises(ValueError, match="crop_pct"):
        build_loader(tv_cfg(noise_root, crop_pct=1.2), "val")
    with pytest.raises(ValueError, match="split='test'"):
        build_loader(tv_cfg(noise_root), "test")
    with pytest.raises(ValueError, match="fewer than data.batch_size=64"):
        build_loader(tv_cfg(noise_root, batch_size=64), "train")
    synthetic = DataConfig(backend="synthetic", batch_size=6, synthetic_train_size=10)
    with pytest.raises(ValueError, match=r"rank 1 of 2 gets 5 of the 10 training samples.*data\.batch_size=6"):
        build_loader(synthetic, "train", rank=1, world_size=2)


# ---------------------------------------------------------------- torchvision backend


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_torchvision_val_sharding_exactly_once(noise_root, world_size):
    all_paths = [p for p, _ in scan_split(str(noise_root), "val")[0]]
    seen, seen_labels = [], []
    for rank in range(world_size):
        loader = build_loader(tv_cfg(noise_root, batch_size=16), "val", rank=rank, world_size=world_size)
        labels = torch.cat([y for _, y in loader])
        assert len(loader) == -(-loader.num_samples // 16)
        assert labels.tolist() == loader.targets
        seen += loader.paths
        seen_labels += loader.targets
    assert seen == all_paths  # each image once, and rank order gives the global order
    assert seen_labels == [label for _, label in scan_split(str(noise_root), "val")[0]]


def test_torchvision_train_equal_batches_per_rank(noise_root):
    lengths = [len(build_loader(tv_cfg(noise_root), "train", rank=r, world_size=3)) for r in range(3)]
    assert lengths == [2, 2, 2]  # floor(50 / 3) = 16 samples -> 2 full batches of 8 on every rank


def test_torchvision_resume_is_bit_exact_for_any_workers(noise_root):
    cfg = tv_cfg(noise_root, num_workers=2)
    loader = build_loader(cfg, "train", seed=7, rank=1, world_size=2)
    loader.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch(3, start_batch=2)
    tail = list(loader)
    loader.set_epoch(4)
    other_epoch = list(loader)
    loader.close()
    loader.close()  # idempotent
    assert len(full) == 3 and len(tail) == 1
    assert torch.equal(tail[0][0], full[2][0]) and torch.equal(tail[0][1], full[2][1])
    assert not torch.equal(torch.cat([y for _, y in other_epoch]), torch.cat([y for _, y in full]))

    single = build_loader(tv_cfg(noise_root, num_workers=0), "train", seed=7, rank=1, world_size=2)
    single.set_epoch(3)
    for (x0, y0), (x1, y1) in zip(single, full, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_torchvision_train_statistics(tmp_path):
    write_photo_split(tmp_path, "train", names=["astronaut"], copies=16, shrink=4)
    check_train_statistics(tv_cfg(tmp_path, batch_size=16, img_size=40))

    flipped = next(iter(build_loader(tv_cfg(tmp_path, batch_size=16, img_size=40, hflip=1.0), "train", seed=1)))[0]
    plain = next(iter(build_loader(tv_cfg(tmp_path, batch_size=16, img_size=40, hflip=0.0), "train", seed=1)))[0]
    assert torch.equal(flipped, plain.flip(-1))  # same crops (same per-sample RNG), mirrored


def test_torchvision_output_format(noise_root):
    loader = build_loader(tv_cfg(noise_root), "val", channels_last=True, dtype=torch.bfloat16)
    images, labels = next(iter(loader))
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    reference = next(iter(build_loader(tv_cfg(noise_root), "val")))[0]
    assert reference.is_contiguous()
    assert torch.allclose(images.float(), reference, atol=0.05)


def test_torchvision_skips_corrupt_files(tmp_path, caplog):
    write_noise_split(tmp_path, "train", 12)
    write_noise_split(tmp_path, "val", 5)
    bad_train = tmp_path / "train" / WNIDS[0] / "broken.JPEG"
    bad_train.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    bad_val = tmp_path / "val" / WNIDS[0] / "empty.JPEG"
    bad_val.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="res2net.data"):
        train = build_loader(tv_cfg(tmp_path, batch_size=13, num_workers=1), "train")
        for epoch in range(2):
            train.set_epoch(epoch)
            images, labels = next(iter(train))
            assert images.shape[0] == 13 and torch.isfinite(images).all()
        train.close()
        val = build_loader(tv_cfg(tmp_path, batch_size=6), "val")
        images, labels = next(iter(val))
    assert train.skipped == 2 and train.skipped_paths == [str(bad_train)]
    assert val.skipped == 1 and val.num_samples == 6 and images.shape[0] == 6
    bad_row = val.paths.index(str(bad_val))
    assert labels[bad_row].item() == 0 and images[bad_row].abs().max() < 0.02  # mean colour -> ~0
    lines = [r.getMessage() for r in caplog.records]
    assert sum(str(bad_train) in line for line in lines) == 1  # one line, not one per epoch
    assert sum(str(bad_val) in line for line in lines) == 1


# ---------------------------------------------------------------- synthetic backend


def test_synthetic_backend():
    cfg = DataConfig(
        backend="synthetic",
        batch_size=4,
        img_size=16,
        synthetic_num_classes=10,
        synthetic_train_size=18,
        synthetic_val_size=11,
    )
    train = build_loader(cfg, "train", rank=1, world_size=2, channels_last=True, dtype=torch.float16)
    assert len(train) == 2 and train.num_samples == 8 and train.num_classes == 10
    batches = list(train)
    assert batches[0][0].data_ptr() == batches[1][0].data_ptr()  # made once, reused
    assert batches[0][0].dtype == torch.float16
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    train.set_epoch(1, start_batch=1)
    assert len(list(train)) == 1
    paths = []
    for rank in range(3):
        val = build_loader(cfg, "val", rank=rank, world_size=3)
        labels = torch.cat([y for _, y in val])
        assert labels.tolist() == val.targets and len(labels) == val.num_samples
        paths += val.paths
    assert len(paths) == len(set(paths)) == 11


def test_random_resized_crop_follows_torchvision():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    draws = augmentation_draws(0, 0, np.arange(3000), scale, ratio, 0.5)
    ours = np.array([random_resized_crop_box(row, 300, 451) for row in draws])
    torch.manual_seed(0)
    theirs = np.array(
        [T.RandomResizedCrop.get_params(torch.empty(3, 300, 451), list(scale), list(ratio)) for _ in range(3000)]
    )
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 300).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 451).all()
    area = lambda b: (b[:, 2] * b[:, 3] / (300 * 451)).mean()  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2]).mean()  # noqa: E731
    assert abs(area(ours) - area(theirs)) < 0.02 and abs(aspect(ours) - aspect(theirs)) < 0.02
    # Images no attempt fits: the same clamped center crop as torchvision.
    for h, w in [(10, 1000), (1000, 10)]:
        expected = T.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
        assert random_resized_crop_box(draws[1], h, w) == expected


def test_sample_uniforms_are_counter_based_and_uniform():
    u = sample_uniforms(3, 1, np.arange(50000), 4)
    assert u.shape == (50000, 4) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.02 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02
    assert np.array_equal(sample_uniforms(3, 1, np.array([777]), 4)[0], u[777])  # any sample on its own
    assert not np.array_equal(sample_uniforms(3, 2, np.arange(10), 4), u[:10])
    assert not np.array_equal(sample_uniforms(4, 1, np.arange(10), 4), u[:10])


@pytest.mark.parametrize("img_size, crop_pct, interpolation", [(224, 0.875, "bilinear"), (97, 0.9, "bicubic")])
def test_torchvision_backend_equals_torchvision_transforms(tmp_path, img_size, crop_pct, interpolation):
    """The reference path: our val batches are torchvision's Resize + CenterCrop + ToTensor + Normalize."""
    write_photo_split(tmp_path, "val", names=["coffee", "rocket_portrait", "astronaut_odd"])
    cfg = tv_cfg(tmp_path, batch_size=3, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation)
    loader = build_loader(cfg, "val")
    images, _ = next(iter(loader))
    mode = T.InterpolationMode.BILINEAR if interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    reference = T.Compose(
        [
            T.Resize(int(img_size / crop_pct), interpolation=mode),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in loader.paths])
    assert torch.allclose(images, expected, atol=1e-5)


def test_torchvision_train_crop_equals_torchvision_resized_crop(tmp_path):
    write_photo_split(tmp_path, "train", names=["chelsea"], copies=8)  # identical files: any order gives the same
    cfg = tv_cfg(tmp_path, batch_size=8, img_size=56)
    loader = build_loader(cfg, "train", seed=4)
    loader.set_epoch(2)
    images, _ = next(iter(loader))
    img = Image.open(loader._dataset.paths[0]).convert("RGB")
    draws = augmentation_draws(4, 2, np.arange(8), cfg.train_crop_scale, cfg.train_crop_ratio, cfg.hflip)
    for row, image in zip(draws, images, strict=True):
        top, left, h, w = random_resized_crop_box(row, img.height, img.width)
        crop = F.resized_crop(img, top, left, h, w, [56, 56], F.InterpolationMode.BILINEAR)
        crop = F.hflip(crop) if row[DRAW_FLIP] else crop
        expected = F.normalize(F.to_tensor(crop), cfg.mean, cfg.std)
        assert torch.allclose(image, expected, atol=1e-5)


# ---------------------------------------------------------------- set_epoch contract (shared by every backend)


@pytest.mark.parametrize("backend", ["torchvision", "synthetic"])
def test_set_epoch_contract(noise_root, backend):
    cfg = tv_cfg(noise_root, backend=backend, synthetic_num_classes=3, synthetic_train_size=20)
    loader = build_loader(cfg, "train")
    assert len(loader) == (6 if backend == "torchvision" else 2)
    check_set_epoch_contract(loader)


# ---------------------------------------------------------------- global RNG state (every backend)


def global_rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_rng_states(before, after):
    assert torch.equal(before[0], after[0]), "torch's global generator moved"
    assert before[1] == after[1], "python's random module moved"
    assert all(np.array_equal(a, b) for a, b in zip(before[2], after[2], strict=True)), "numpy's global RNG moved"


@pytest.mark.parametrize(
    "backend, num_workers", [("torchvision", 0), ("torchvision", 2), ("dali", 1), ("synthetic", 0)]
)
def test_loaders_leave_the_global_rngs_alone(noise_root, backend, num_workers):
    """Creating, iterating (whole and cut-short epochs, a resumed one) and closing a loader draws nothing from
    torch's, python's or numpy's global generators, so a training step sees the same random state after a
    resume as in the uninterrupted run."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = tv_cfg(
        noise_root,
        backend=backend,
        num_workers=num_workers,
        synthetic_num_classes=3,
        synthetic_train_size=50,
        synthetic_val_size=101,
    )
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    before = global_rng_states()
    for split in ("train", "val"):
        loader = build_loader(cfg, split, seed=5, rank=1, world_size=2)
        for epoch, start_batch in ((0, 0), (1, 1), (1, 0)):
            loader.set_epoch(epoch, start_batch)
            assert len(list(loader)) == len(loader) - start_batch
        batches = iter(loader)
        next(batches)  # an epoch cut short (a stop request), then a fresh iterator
        del batches
        loader.set_epoch(2)
        next(iter(loader))
        loader.close()
    assert_same_rng_states(before, global_rng_states())
