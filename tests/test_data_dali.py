"""DALI backend in CPU-only mode (device_id=None): parity with PIL on real photographs, train statistics,
order / resume / sharding, errors. Only the 'mixed' (GPU) decoding test needs CUDA."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2net.data import DataConfig, build_loader, scan_split
from test_data_helpers import colour_ids, grey_level_diff, write_colour_split, write_noise_split, write_photo_split

pytest.importorskip("nvidia.dali")
MEAN, STD = DataConfig().mean, DataConfig().std


def cfg_for(root, backend="dali", **kw) -> DataConfig:
    base = dict(root=str(root), backend=backend, batch_size=8, num_workers=1, img_size=32)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_photo_split(root, "val")
    return root


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("noise")
    write_noise_split(root, "train", 50, seed=1)
    write_noise_split(root, "val", 101, seed=2)
    return root


@pytest.mark.parametrize("img_size, crop_pct, interpolation", [
    (224, 0.875, "bilinear"), (288, 1.0, "bilinear"), (160, 0.95, "bilinear"), (97, 0.9, "bilinear"),
    (224, 0.875, "bicubic"),
])
def test_val_parity_with_pil_on_photographs(photo_root, img_size, crop_pct, interpolation):
    def batch(backend):
        cfg = cfg_for(photo_root, backend, batch_size=16, img_size=img_size, crop_pct=crop_pct,
                      interpolation=interpolation, num_workers=0 if backend == "torchvision" else 1)
        loader = build_loader(cfg, "val")
        images, labels = next(iter(loader))
        return images, labels, loader.paths

    pil_images, pil_labels, pil_paths = batch("torchvision")
    dali_images, dali_labels, dali_paths = batch("dali")
    assert pil_paths == dali_paths and len(pil_paths) == 8
    assert torch.equal(pil_labels, dali_labels)
    assert dali_images.shape == pil_images.shape == (8, 3, img_size, img_size)
    diffs = grey_level_diff(dali_images, pil_images, STD)
    assert (diffs < 0.5).all(), dict(zip((Path(p).name for p in pil_paths), diffs.round(3)))


def test_cmyk_grayscale_and_png_named_jpeg_decode_like_pil(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    folder = tmp_path / "val" / "n01440764"
    folder.mkdir(parents=True)
    Image.fromarray(rgb).convert("CMYK").save(folder / "a_cmyk.JPEG", "JPEG")
    Image.fromarray(rgb).save(folder / "b_png.JPEG", "PNG")
    Image.fromarray(rgb[..., 0]).save(folder / "c_gray.JPEG", "JPEG")
    batches = [next(iter(build_loader(cfg_for(tmp_path, backend, num_workers=1, crop_pct=1.0), "val")))[0]
               for backend in ("torchvision", "dali")]
    assert (grey_level_diff(*batches, STD) < 0.5).all()


def test_train_statistics(tmp_path):
    write_photo_split(tmp_path, "train", names=["astronaut"], copies=16, shrink=4)
    cfg = cfg_for(tmp_path, batch_size=16, img_size=40)
    images, labels = next(iter(build_loader(cfg, "train", seed=1)))
    assert images.shape == (16, 3, 40, 40) and images.dtype == torch.float32 and labels.dtype == torch.int64
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert (images >= -mean / std - 1e-5).all() and (images <= (1 - mean) / std + 1e-5).all()
    pairwise = (images[:, None] - images[None]).abs().flatten(2).mean(-1)
    assert (pairwise + torch.eye(16) > 0.05).all()  # crops vary

    # Full-image crops (square photo, scale 1, ratio 1) isolate the flip: p=1 mirrors p=0, and both equal PIL.
    fixed = dict(batch_size=16, img_size=40, train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0])
    plain = next(iter(build_loader(cfg_for(tmp_path, hflip=0.0, **fixed), "train")))[0]
    flipped = next(iter(build_loader(cfg_for(tmp_path, hflip=1.0, **fixed), "train")))[0]
    assert torch.equal(flipped, plain.flip(-1))
    pil = next(iter(build_loader(cfg_for(tmp_path, "torchvision", hflip=0.0, num_workers=0, **fixed), "train")))[0]
    assert (grey_level_diff(plain, pil, STD) < 1.0).all()
    half = next(iter(build_loader(cfg_for(tmp_path, hflip=0.5, **fixed), "train")))[0]
    is_flipped = [torch.equal(h, flipped[0]) for h in half]
    assert 0 < sum(is_flipped) < 16  # flips vary from sample to sample


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    write_colour_split(root, "train", 50)
    return root


def test_train_order_matches_torchvision_and_resumes(colour_root):
    def loaders(backend):
        cfg = cfg_for(colour_root, backend, num_workers=0 if backend == "torchvision" else 1)
        return build_loader(cfg, "train", seed=5, rank=1, world_size=2)

    def ids(loader, epoch, start_batch=0):
        loader.set_epoch(epoch, start_batch)
        return [colour_ids(x, MEAN, STD) for x, _ in loader]

    dali, tv = loaders("dali"), loaders("torchvision")
    assert len(dali) == len(tv) == 3
    order = {epoch: ids(dali, epoch) for epoch in (0, 1)}
    assert order[0] == ids(tv, 0) and order[1] == ids(tv, 1)  # both backends: same files, same order
    assert order[0] != order[1]
    ours = [i for batch in order[0] for i in batch]
    rank0 = build_loader(cfg_for(colour_root), "train", seed=5, rank=0, world_size=2)
    others = [i for batch in ids(rank0, 0) for i in batch]
    assert not set(ours) & set(others) and len(ours) == len(others) == 24
    assert ids(dali, 1, start_batch=1) == order[1][1:]  # resume: exactly the tail batches
    dali.close()
    dali.close()


def test_train_same_seed_and_epoch_same_batches(noise_root):
    def epoch_batches(epoch):
        loader = build_loader(cfg_for(noise_root), "train", seed=3)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch_batches(2), epoch_batches(2))
    assert not torch.equal(epoch_batches(2), epoch_batches(3))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_val_sharding_exactly_once(noise_root, world_size):
    all_samples = scan_split(str(noise_root), "val")[0]
    seen, counted = [], 0
    for rank in range(world_size):
        loader = build_loader(cfg_for(noise_root, batch_size=16), "val", rank=rank, world_size=world_size)
        labels = torch.cat([y for _, y in loader])
        assert labels.tolist() == loader.targets and len(labels) == loader.num_samples
        assert len(loader) == -(-loader.num_samples // 16)
        seen += loader.paths
        counted += len(labels)
    assert seen == [p for p, _ in all_samples] and counted == 101


def test_undecodable_file_error_names_files_and_fix(tmp_path):
    write_noise_split(tmp_path, "val", 4)
    (tmp_path / "val" / "n01440764" / "zz_broken.JPEG").write_bytes(b"not a jpeg at all")
    loader = build_loader(cfg_for(tmp_path, batch_size=8), "val")
    with pytest.raises(RuntimeError, match=r"(?s)zz_broken\.JPEG.*check_dataset\.py"):
        list(loader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_mixed_decoder_without_cuda_is_a_clear_error(noise_root):
    with pytest.raises(RuntimeError, match="dali_decoder='mixed'.*CUDA is not available"):
        build_loader(cfg_for(noise_root, dali_decoder="mixed"), "val")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_decoding_matches_cpu_path(photo_root):
    cuda = torch.device("cuda")
    cfg = cfg_for(photo_root, batch_size=16, img_size=224)
    gpu_loader = build_loader(cfg, "val", device=cuda)
    assert gpu_loader.decoder == "mixed"
    gpu_images, gpu_labels = next(iter(gpu_loader))
    assert gpu_images.device.type == "cuda" and gpu_labels.device.type == "cuda"
    cpu_images, cpu_labels = next(iter(build_loader(cfg, "val")))
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    assert (grey_level_diff(gpu_images, cpu_images, STD) < 0.5).all()
    half = build_loader(cfg_for(photo_root, batch_size=4, img_size=64), "val", device=cuda, channels_last=True,
                        dtype=torch.float16)
    images, _ = next(iter(half))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
