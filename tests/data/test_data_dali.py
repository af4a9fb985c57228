"""DALI backend in CPU-only mode (device_id=None): parity with PIL on real photographs, train statistics,
order / resume / sharding, errors. Only the 'mixed' (GPU) decoding test needs CUDA."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from test_data_helpers import (
    check_set_epoch_contract,
    check_train_statistics,
    colour_ids,
    grey_level_diff,
    write_colour_split,
    write_noise_split,
    write_photo_split,
)

from res2net.config import register_configs
from res2net.data import DataConfig, as_data_config, build_loader, scan_split
from res2net.data.index import train_positions
from res2net.data.transforms import DRAW_FLIP, augmentation_draws, random_resized_crop_box

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


@pytest.mark.parametrize(
    "img_size, crop_pct, interpolation",
    [
        (224, 0.875, "bilinear"),
        (288, 1.0, "bilinear"),
        (160, 0.95, "bilinear"),
        (97, 0.9, "bilinear"),
        (224, 0.875, "bicubic"),
    ],
)
def test_val_parity_with_pil_on_photographs(photo_root, img_size, crop_pct, interpolation):
    def batch(backend):
        cfg = cfg_for(
            photo_root,
            backend,
            batch_size=16,
            img_size=img_size,
            crop_pct=crop_pct,
            interpolation=interpolation,
            num_workers=0 if backend == "torchvision" else 1,
        )
        loader = build_loader(cfg, "val")
        images, labels = next(iter(loader))
        return images, labels, loader.paths

    pil_images, pil_labels, pil_paths = batch("torchvision")
    dali_images, dali_labels, dali_paths = batch("dali")
    assert pil_paths == dali_paths and len(pil_paths) == 8
    assert torch.equal(pil_labels, dali_labels)
    assert dali_images.shape == pil_images.shape == (8, 3, img_size, img_size)
    diffs = grey_level_diff(dali_images, pil_images, STD)
    assert (diffs < 0.5).all(), dict(zip((Path(p).name for p in pil_paths), diffs.round(3), strict=True))


def test_cmyk_grayscale_and_png_named_jpeg_decode_like_pil(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    folder = tmp_path / "val" / "n01440764"
    folder.mkdir(parents=True)
    Image.fromarray(rgb).convert("CMYK").save(folder / "a_cmyk.JPEG", "JPEG")
    Image.fromarray(rgb).save(folder / "b_png.JPEG", "PNG")
    Image.fromarray(rgb[..., 0]).save(folder / "c_gray.JPEG", "JPEG")
    batches = [
        next(iter(build_loader(cfg_for(tmp_path, backend, num_workers=1, crop_pct=1.0), "val")))[0]
        for backend in ("torchvision", "dali")
    ]
    assert (grey_level_diff(*batches, STD) < 0.5).all()


def test_train_statistics(tmp_path):
    write_photo_split(tmp_path, "train", names=["astronaut"], copies=16, shrink=4)
    check_train_statistics(cfg_for(tmp_path, batch_size=16, img_size=40))

    # Full-image crops (square photo, scale 1, ratio 1) isolate the flip: p=1 mirrors p=0, and both equal PIL.
    fixed = dict(batch_size=16, img_size=40, train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0])
    plain = next(iter(build_loader(cfg_for(tmp_path, hflip=0.0, **fixed), "train")))[0]
    flipped = next(iter(build_loader(cfg_for(tmp_path, hflip=1.0, **fixed), "train")))[0]
    assert torch.equal(flipped, plain.flip(-1))
    pil = next(iter(build_loader(cfg_for(tmp_path, "torchvision", hflip=0.0, num_workers=0, **fixed), "train")))[0]
    assert (grey_level_diff(plain, pil, STD) < 0.1).all()
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
    dali.close()
    dali.close()


def test_train_augmentation_matches_torchvision_and_resume_is_exact(tmp_path):
    write_photo_split(tmp_path, "train", copies=3, shrink=2)
    dali = build_loader(cfg_for(tmp_path, img_size=48, num_workers=2), "train", seed=9)
    dali.set_epoch(4)
    full = [(x.clone(), y.clone()) for x, y in dali]
    dali.set_epoch(4, start_batch=2)
    tail = list(dali)
    assert len(full) == 3 and len(tail) == 1
    assert torch.equal(tail[0][0], full[2][0]) and torch.equal(tail[0][1], full[2][1])  # bit-exact resume
    single_thread = build_loader(cfg_for(tmp_path, img_size=48, num_workers=1), "train", seed=9)
    single_thread.set_epoch(4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single_thread, full, strict=True))

    tv = build_loader(cfg_for(tmp_path, "torchvision", img_size=48, num_workers=0), "train", seed=9)
    tv.set_epoch(4)
    for (xd, yd), (xt, yt) in zip(full, tv, strict=True):
        assert torch.equal(yd, yt)
        # Same crops and flips, decoded by DALI vs PIL and resized by torch vs PIL (the same filters): a crop one
        # pixel off would differ by whole grey levels.
        assert (grey_level_diff(xd, xt, STD) < 0.1).all()


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
def test_mixed_decoding_matches_cpu_path(photo_root, tmp_path):
    cuda = torch.device("cuda")
    cfg = cfg_for(photo_root, batch_size=16, img_size=224)
    gpu_loader = build_loader(cfg, "val", device=cuda)
    assert gpu_loader.decoder == "mixed"
    gpu_images, gpu_labels = next(iter(gpu_loader))
    assert gpu_images.device.type == "cuda" and gpu_labels.device.type == "cuda"
    cpu_images, cpu_labels = next(iter(build_loader(cfg, "val")))
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    assert (grey_level_diff(gpu_images, cpu_images, STD) < 0.5).all()
    # The same graph on the CPU (data.dali_resize=graph, what the CPU tests check): only the decoders differ.
    cpu_graph = next(iter(build_loader(cfg_for(photo_root, batch_size=16, img_size=224, dali_resize="graph"), "val")))[
        0
    ]
    assert (grey_level_diff(gpu_images, cpu_graph, STD) < 0.5).all()
    with pytest.raises(ValueError, match=r"data\.dali_resize='torch'.*'mixed' decoding"):
        build_loader(cfg_for(photo_root, dali_resize="torch"), "val", device=cuda)  # auto decoding -> 'mixed'

    write_photo_split(tmp_path, "train", copies=2)
    train_cfg = cfg_for(tmp_path, batch_size=16, img_size=64)
    gpu_train = build_loader(train_cfg, "train", seed=2, device=cuda, channels_last=True, dtype=torch.float16)
    images, labels = next(iter(gpu_train))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    cpu_train, cpu_labels = next(iter(build_loader(train_cfg, "train", seed=2)))
    assert torch.equal(labels.cpu(), cpu_labels)
    assert (grey_level_diff(images.float(), cpu_train, STD) < 1.0).all()  # same crops and flips on the GPU
    cpu_graph_train = build_loader(
        cfg_for(tmp_path, batch_size=16, img_size=64, dali_resize="graph"),
        "train",
        seed=2,
        channels_last=True,
        dtype=torch.float16,
    )
    assert (grey_level_diff(images.float(), next(iter(cpu_graph_train))[0].float(), STD) < 1.0).all()


def test_train_boxes_are_torchvisions_from_the_file_header(tmp_path):
    """The graph decodes exactly the box transforms.random_resized_crop_box (the torchvision backend's function)
    picks for the file's PIL size and the position's draws, for every batch, also past the end of the epoch (the
    pipeline prefetches across it) and after a resume."""
    photos = write_photo_split(tmp_path, "train", copies=2, shrink=3)
    Image.open(photos[0][0]).save(photos[0][0], "PNG")  # a PNG named .JPEG: its size comes from PIL
    cfg = cfg_for(tmp_path, batch_size=4, train_crop_scale=[0.05, 1.0], train_crop_ratio=[0.2, 5.0])
    loader = build_loader(cfg, "train", seed=4, rank=1, world_size=2)
    assert sum(len(x) for x, _ in loader) == len(loader) * 4
    loader.set_epoch(3)
    indices, positions = loader.epoch_positions(3)
    assert np.array_equal(positions, train_positions(len(loader._paths), 1, 2, 4, 3)[1][: len(indices)])
    for start in (0, 1):
        source = loader._boxes_source(indices[start * 4 :], positions[start * 4 :])
        n = len(indices) - start * 4
        for it in range(len(loader) - start + 2):
            anchors, shapes, flips = source(SimpleNamespace(iteration=it))
            pos = positions[start * 4 + (it * 4 + np.arange(4)) % n]
            draws = augmentation_draws(4, 3, pos, cfg.train_crop_scale, cfg.train_crop_ratio, cfg.hflip)
            for j in range(4):
                with Image.open(loader._paths[indices[start * 4 + (it * 4 + j) % n]]) as img:
                    expected = random_resized_crop_box(draws[j], img.height, img.width)
                assert (*anchors[j], *shapes[j]) == expected and int(flips[j]) == draws[j, DRAW_FLIP]


def test_jpeg_header_size_equals_pil(tmp_path):
    from res2net.data.loader_dali import jpeg_size

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    variants = {
        "baseline.jpg": lambda p: img.save(p, "JPEG"),
        "progressive.jpg": lambda p: img.save(p, "JPEG", progressive=True),
        "cmyk.jpg": lambda p: img.convert("CMYK").save(p, "JPEG"),
        "gray.jpg": lambda p: img.convert("L").save(p, "JPEG"),
        "big_icc.jpg": lambda p: img.save(p, "JPEG", icc_profile=bytes(range(256)) * 300),  # APP2 > 4 KiB
        "big_exif.jpg": lambda p: img.save(p, "JPEG", exif=b"Exif\x00\x00" + bytes(30000)),
    }
    for name, save in variants.items():
        save(tmp_path / name)
        assert jpeg_size(str(tmp_path / name)) == (37, 53), name
    img.save(tmp_path / "png.JPEG", "PNG")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "big_icc.jpg").read_bytes()[:5000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert [jpeg_size(str(tmp_path / n)) for n in ("png.JPEG", "cut.jpg", "empty.jpg")] == [None] * 3


def test_train_unreadable_file_error_names_it(tmp_path):
    write_noise_split(tmp_path, "train", 12)
    (tmp_path / "train" / "n01440764" / "img_0003.JPEG").write_bytes(b"not a jpeg at all")
    loader = build_loader(cfg_for(tmp_path, batch_size=4), "train")
    with pytest.raises(RuntimeError, match=r"(?s)img_0003\.JPEG.*check_dataset\.py"):
        list(loader)


@pytest.mark.parametrize(
    "channels_last, dtype", [(True, torch.float32), (False, torch.bfloat16), (True, torch.float16)]
)
def test_train_output_layout_and_dtype(tmp_path, channels_last, dtype):
    """Normalization happens in the graph; layout and dtype follow the request, values those of float32 NCHW."""
    write_photo_split(tmp_path, "train", names=["coffee"], copies=8, shrink=4)
    reference = next(iter(build_loader(cfg_for(tmp_path), "train", seed=2)))[0]
    images = next(iter(build_loader(cfg_for(tmp_path), "train", seed=2, channels_last=channels_last, dtype=dtype)))[0]
    assert images.dtype == dtype and images.shape == reference.shape
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(images.float(), reference, atol=0.02 if dtype != torch.float32 else 0.0)


def test_set_epoch_contract(noise_root):
    loader = build_loader(cfg_for(noise_root), "val")
    assert len(loader) == 13  # ceil(101 / 8)
    check_set_epoch_contract(loader)


# data.dali_resize=graph on the CPU: the graph the GPU runs ('mixed' decoding), built by the same functions
# (_train_graph / _val_graph / _normalize_graph), only decoded by libjpeg-turbo and placed on the CPU.


def test_graph_path_val_parity_with_pil_on_photographs(photo_root):
    """fn.resize with the val roi + crop_mirror_normalize: within DALI's resize tolerance of PIL for several
    (img_size, crop_pct, interpolation); channels_last + float16 give the same values in that layout and type."""
    for img_size, crop_pct, interpolation in (
        (224, 0.875, "bilinear"),
        (160, 0.95, "bilinear"),
        (97, 0.9, "bilinear"),
        (288, 1.0, "bicubic"),
    ):
        size_kw = dict(batch_size=16, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation)
        tv = build_loader(cfg_for(photo_root, "torchvision", num_workers=0, **size_kw), "val")
        graph = build_loader(cfg_for(photo_root, dali_resize="graph", **size_kw), "val")
        assert graph.decoder == "cpu" and graph.resize == "graph" and graph.paths == tv.paths
        (pil_images, pil_labels), (images, labels) = next(iter(tv)), next(iter(graph))
        assert torch.equal(labels, pil_labels) and images.shape == pil_images.shape == (8, 3, img_size, img_size)
        diffs = grey_level_diff(images, pil_images, STD)
        names = [Path(p).name for p in tv.paths]
        assert (diffs < 0.5).all(), (img_size, crop_pct, dict(zip(names, diffs.round(3), strict=True)))
        if img_size == 224:
            torch_path = next(iter(build_loader(cfg_for(photo_root, **size_kw), "val")))[0]
            assert not torch.equal(images, torch_path)  # DALI's resize ran, not torch's
            half = build_loader(
                cfg_for(photo_root, dali_resize="graph", **size_kw), "val", channels_last=True, dtype=torch.float16
            )
            assert half._graph_dtype()[1] == torch.float16  # crop_mirror_normalize writes float16 on the CPU too
            half_images = next(iter(half))[0]
            assert half_images.dtype == torch.float16 and half_images.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(half_images, images.half())


def test_graph_path_train_matches_torchvision_resumes_exactly_and_follows_layout_and_dtype(tmp_path):
    write_photo_split(tmp_path, "train", copies=3, shrink=2)
    graph = dict(img_size=48, num_workers=2, dali_resize="graph")
    dali = build_loader(cfg_for(tmp_path, **graph), "train", seed=9)
    assert dali.decoder == "cpu" and dali.resize == "graph"
    dali.set_epoch(4)
    full = [(x.clone(), y.clone()) for x, y in dali]
    dali.set_epoch(4, start_batch=1)
    tail = list(dali)
    assert len(full) == 3 and len(tail) == 2
    for (xa, ya), (xb, yb) in zip(tail, full[1:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # bit-exact resume

    tv = build_loader(cfg_for(tmp_path, "torchvision", img_size=48, num_workers=0), "train", seed=9)
    tv.set_epoch(4)
    for (xd, yd), (xt, yt) in zip(full, tv, strict=True):
        assert torch.equal(yd, yt)
        # The same crops and flips, resized by DALI instead of PIL: a crop one pixel off or a missed flip would
        # differ by whole grey levels.
        assert (grey_level_diff(xd, xt, STD) < 0.5).all(), grey_level_diff(xd, xt, STD).round(3)
    torch_path = build_loader(cfg_for(tmp_path, img_size=48, num_workers=2), "train", seed=9)
    torch_path.set_epoch(4)
    assert not torch.equal(next(iter(torch_path))[0], full[0][0])  # DALI's resize ran, not torch's

    for channels_last, dtype in ((True, torch.float32), (False, torch.bfloat16), (True, torch.float16)):
        loader = build_loader(cfg_for(tmp_path, **graph), "train", seed=9, channels_last=channels_last, dtype=dtype)
        loader.set_epoch(4, start_batch=2)
        images = next(iter(loader))[0]
        assert images.dtype == dtype and images.shape == full[2][0].shape
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # The same values as the float32 NCHW batch, cast (float16: written by crop_mirror_normalize itself).
        assert torch.equal(images, full[2][0].to(dtype)), (channels_last, dtype)


def test_dali_resize_choices_are_validated(noise_root):
    from res2net.data.loader_dali import resolve_resize

    with pytest.raises(RuntimeError, match=r"data\.dali_decoder='mixed' decodes on a CUDA GPU"):  # no GPU here
        build_loader(cfg_for(noise_root, dali_decoder="mixed", dali_resize="torch"), "val")
    with pytest.raises(ValueError, match=r"data\.dali_resize='gpu'.*\('auto', 'graph', 'torch'\)"):
        build_loader(cfg_for(noise_root, dali_resize="gpu"), "val")
    # dali_decoder=auto becomes 'mixed' only inside the loader (CUDA device): the same rule applies there.
    with pytest.raises(ValueError, match=r"data\.dali_resize='torch'.*'mixed' decoding.*\('auto', 'graph'\)"):
        resolve_resize("torch", "mixed")
    assert [resolve_resize(c, "cpu") for c in ("auto", "graph", "torch")] == ["torch", "graph", "torch"]
    assert [resolve_resize(c, "mixed") for c in ("auto", "graph")] == ["graph", "graph"]
    assert build_loader(cfg_for(noise_root), "val").resize == "torch"


def test_dali_resize_composes_from_the_command_line():
    register_configs()
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        default = compose(config_name="train")
        graph = compose(config_name="train", overrides=["data.dali_resize=graph"])
    assert as_data_config(default.data).dali_resize == "auto"
    assert as_data_config(graph.data).dali_resize == "graph"
