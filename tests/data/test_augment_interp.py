"""The geometric augment ops under every data.interpolation (bicubic: our own batched affine, as torchvision's tensor
ops have no bicubic mode), and the loader error wrappers: only a file that cannot be read or decoded is blamed on
the data; any other exception out of a loader keeps its own type, message and traceback."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_data_helpers import grey_level_diff, write_noise_split, write_photo_split

from res2net.data import DataConfig, build_loader, loader_dali
from res2net.data.augment import GEOMETRIC, OP_ID, affine_images, affine_theta, apply_ops, augment_plan, parse_policy
from res2net.data.loader_base import DataReadError, is_read_error
from res2net.engine.distributed import DistInfo
from res2net.engine.train_loop import TrainState, _guarded

STD = DataConfig().std
FILL = [float(round(255 * m)) for m in DataConfig().mean]
# Every sample draws 4 ops at the top magnitude: geometric ones are certain in a batch of 4.
STRONG = "rand-n4-m10"


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photo_split(root, "train", copies=2, shrink=4)
    return root


def smooth_image(seed=0, h=24, w=32):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, h, w, generator=g) * 255
    return torch.nn.functional.avg_pool2d(img, 5, 1, 2)[0].round().to(torch.uint8)


@pytest.mark.parametrize("op, value", [("rotate", 23.0), ("shear_x", -0.27), ("shear_y", 0.2), ("translate_x", 6.5)])
def test_affine_equals_torchvisions_bilinear_and_bicubic_stays_close(op, value):
    """Our affine (affine_theta + affine_images) reproduces torchvision's bilinear tensor op (off by one grey level
    at a few rounding boundaries at most); bicubic differs from bilinear by resampling only (a fraction of the
    image's range), and the identity matrix leaves every pixel as it is, in both modes."""
    img = smooth_image()
    ref = apply_ops(img, plan_of([(op, value)]), "bilinear", FILL)
    theta = torch.from_numpy(affine_theta(op, value, *img.shape[-2:]))[None]
    ours = affine_images(img[None], theta, torch.tensor(FILL), "bilinear")[0]
    diff = (ref.int() - ours.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())
    bicubic = apply_ops(img, plan_of([(op, value)]), "bicubic", FILL)
    assert bicubic.dtype == torch.uint8 and bicubic.shape == img.shape
    assert 0 < (bicubic.float() - ref.float()).abs().mean() < 6  # resampled differently, the same warp
    identity = torch.from_numpy(affine_theta("identity", 0.0, *img.shape[-2:]))[None]
    for mode in ("bilinear", "bicubic", "nearest"):
        assert torch.equal(affine_images(img[None], identity, torch.tensor(FILL), mode)[0], img)


def test_bicubic_fill_and_overshoot_stay_in_range():
    """A hard black/white edge rotated bicubically overshoots in float: clamped to [0, 255], and the corners
    brought in from outside take the fill colour."""
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, 16:] = 255
    theta = torch.from_numpy(affine_theta("rotate", 45.0, 32, 32))[None]
    out = affine_images(img[None], theta, torch.tensor(FILL), "bicubic")[0]
    assert out.dtype == torch.uint8
    assert out[:, 0, 0].tolist() == [round(f) for f in FILL]  # a corner: outside the source
    float_out = torch.nn.functional.grid_sample(
        img[None].float(), torch.nn.functional.affine_grid(theta.float(), [1, 3, 32, 32], align_corners=False),
        mode="bicubic", align_corners=False,
    )  # fmt: skip
    assert float_out.min() < -1 and float_out.max() > 256  # what the clamp is for


def plan_of(ops):
    plan = augment_plan(None, 0.0, 0, 0, np.arange(1), 8).row(0)
    plan.ops = np.array([OP_ID[op] for op, _ in ops])
    plan.params = np.array([float(v) for _, v in ops])
    return plan


@pytest.mark.parametrize("backend, extra", [("torchvision", {}), ("dali", {}), ("dali", {"dali_resize": "graph"})])
def test_bicubic_presets_augment_in_every_backend(photo_root, backend, extra):
    """rsb_a1/a2/a3 set data.interpolation=bicubic with RandAugment: every backend trains on it (it crashed on the
    first geometric op), and the bicubic batches differ from the bilinear ones only by resampling."""
    cfg = dict(root=str(photo_root), backend=backend, batch_size=4, img_size=32, auto_augment=STRONG, **extra)
    cfg["num_workers"] = 0 if backend == "torchvision" else 1
    plan = augment_plan(parse_policy(STRONG), 0.0, 3, 0, np.arange(4), 32)
    assert np.isin(plan.ops, [OP_ID[g] for g in GEOMETRIC]).any()
    batches = {}
    for interp in ("bicubic", "bilinear"):
        loader = build_loader(DataConfig(**cfg, interpolation=interp), "train", seed=3)
        loader.set_epoch(0)
        batches[interp] = torch.cat([x for x, _ in loader])
        loader.close()
    assert torch.isfinite(batches["bicubic"]).all() and batches["bicubic"].shape == (16, 3, 32, 32)
    diffs = grey_level_diff(batches["bicubic"], batches["bilinear"], STD)
    assert (diffs < 12).all() and diffs.max() > 0, diffs


def guarded(batches):
    def loader():
        yield from batches
        raise batches.pop()

    run = SimpleNamespace(
        train_loader=loader(),
        state=TrainState(epoch=2, step_in_epoch=5),
        dist=DistInfo(rank=1),
        steps_per_epoch=9,
        data_root="/data/x",
    )
    return _guarded(run)


def test_guarded_blames_files_only_for_read_errors():
    bug = ValueError("Interpolation mode 'bicubic' is unsupported with Tensor input")
    with pytest.raises(ValueError) as info:
        list(guarded([1, bug]))
    assert info.value is bug and "check_dataset" not in str(info.value)  # a bug keeps its message and traceback
    for err in (DataReadError("cannot decode /data/x/a.JPEG"), FileNotFoundError("/data/x/a.JPEG")):
        with pytest.raises(RuntimeError, match=r"rank 1 at epoch 2, batch 5 of 9.*a\.JPEG.*check_dataset") as info:
            list(guarded([1, err]))
        assert info.value.__cause__ is err
    assert is_read_error(DataReadError("x")) and not is_read_error(RuntimeError("CUDA error"))


def test_dali_wraps_undecodable_files_but_not_a_bug(tmp_path, monkeypatch):
    """A broken JPEG is named with the fix; a RuntimeError raised by our own code inside the pipeline (here the
    crop-box callback) comes out as itself, without any advice about files."""
    write_noise_split(tmp_path, "train", 8)
    cfg = DataConfig(root=str(tmp_path), backend="dali", batch_size=4, num_workers=1, img_size=32)
    (tmp_path / "train" / "n01440764" / "img_0003.JPEG").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataReadError, match=r"(?s)img_0003\.JPEG.*check_dataset\.py"):
        list(build_loader(cfg, "train"))
    (tmp_path / "train" / "n01440764" / "img_0003.JPEG").unlink()

    def broken_box(*args):
        raise RuntimeError("a bug in the crop box")

    monkeypatch.setattr(loader_dali, "random_resized_crop_box", broken_box)
    with pytest.raises(Exception, match="a bug in the crop box") as info:
        list(build_loader(cfg, "train"))
    assert not is_read_error(info.value) and "check_dataset" not in str(info.value)
