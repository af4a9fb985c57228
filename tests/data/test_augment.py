"""Per-sample augmentation (res2net/data/augment.py): policy strings and magnitudes against timm and torchvision,
plans from the counter-based stream, each knob changing only what it should, bit-exact resume with everything on,
both backends applying the same plan, progressive resizing and val_img_size."""

import math
import random

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_data_helpers import grey_level_diff, write_noise_split, write_photo_split
from timm.data import auto_augment as timm_aa
from torchvision.transforms import InterpolationMode, v2

from res2net.config import register_configs
from res2net.data import DataConfig, as_data_config, build_loader
from res2net.data.augment import (
    _ORIGINAL_POLICY,
    _RAND_INCREASING_OPS,
    _RAND_OPS,
    _TIMM_OPS,
    OP_ID,
    OPS,
    Policy,
    _timm_param,
    apply_ops,
    augment_plan,
    erase_boxes,
    erase_noise,
    parse_policy,
)
from res2net.data.transforms import train_img_size

MEAN, STD = DataConfig().mean, DataConfig().std
FILL = [float(round(255 * m)) for m in MEAN]
ALL_ON = dict(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.5, color_jitter=0.3, repeated_aug=3)


def cfg_for(root, backend="torchvision", **kw) -> DataConfig:
    base = dict(root=str(root), backend=backend, batch_size=4, num_workers=0 if backend == "torchvision" else 1)
    base.update(img_size=32)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photo_split(root, "train", copies=2, shrink=4)
    write_photo_split(root, "val", shrink=4)
    return root


def epoch(loader, e, start=0):
    loader.set_epoch(e, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_policy_strings_parse_like_timm():
    assert parse_policy(None) is None and parse_policy("") is None
    assert parse_policy("rand-m9-mstd0.5-inc1") == Policy("rand", 2, 9.0, 0.5, 10.0, 0.5, True)
    assert parse_policy("rand-m7-mstd0.5") == Policy("rand", magnitude=7.0, magnitude_std=0.5)
    assert parse_policy("rand-m6-mstd0.5").magnitude == 6.0
    assert parse_policy("rand-n3-m15-mmax20-p0.7") == Policy("rand", 3, 15.0, 0.0, 20.0, 0.7, False)
    assert parse_policy("rand-m9-mstd101").magnitude_std == math.inf  # timm: > 100 means uniform
    assert parse_policy("ta_wide") == Policy("ta_wide") and parse_policy("ta_wide").slots == 1
    assert parse_policy("original-mstd0.5") == Policy("original", magnitude_std=0.5)
    for bad in ("augmix-m3", "rand-x3", "rand-m", "randaug", "original-m3", "ta_wide-m3"):
        with pytest.raises(ValueError, match="data.auto_augment=.*(rand-m<M>|number)"):
            parse_policy(bad)
    with pytest.raises(ValueError, match=r"data\.auto_augment='augmix'.*ta_wide"):
        build_loader(DataConfig(backend="synthetic", auto_augment="augmix"), "train")


def test_op_lists_and_policy_are_timms():
    assert _RAND_OPS == timm_aa._RAND_TRANSFORMS
    assert _RAND_INCREASING_OPS == timm_aa._RAND_INCREASING_TRANSFORMS
    timm_policy = timm_aa.auto_augment_policy_original({})
    assert [[(op.name, op.prob, op.magnitude) for op in sp] for sp in timm_policy] == _ORIGINAL_POLICY


@pytest.mark.parametrize("name", sorted(set(_TIMM_OPS)))
def test_magnitude_mappings_are_timms(name):
    """Our level -> parameter equals timm's LEVEL_TO_ARG for every op and level, for either sign."""
    hparams = dict(timm_aa._HPARAMS_DEFAULT, translate_pct=0.45)
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    size = 100
    for level in np.linspace(0, 10, 21):
        ours = {_timm_param(name, level, negate, size)[1] for negate in (False, True)}
        assert len({_timm_param(name, level, n, size)[0] for n in (False, True)}) == 1
        for trial in range(4):
            random.seed(trial)
            expected = level_fn(level, hparams)[0] if level_fn else 0.0
            if "Translate" in name:
                expected *= size
            assert any(math.isclose(expected, v, abs_tol=1e-9) for v in ours), (level, expected, ours)


def test_plan_is_counter_based_and_follows_the_policy():
    policy = parse_policy("rand-m9-mstd0.5-inc1")
    positions = np.arange(4000)
    plan = augment_plan(policy, 0.0, 3, 2, positions, 64)
    part = augment_plan(policy, 0.0, 3, 2, positions[1234:1240], 64)
    assert np.array_equal(part.ops, plan.ops[1234:1240]) and np.array_equal(part.params, plan.params[1234:1240])
    other_epoch = augment_plan(policy, 0.0, 3, 3, positions, 64)
    assert not np.array_equal(other_epoch.ops, plan.ops)
    applied = plan.ops != 0
    assert abs(applied.mean() - 0.5) < 0.03  # timm's per-op probability 0.5
    counts = np.bincount(plan.ops[applied], minlength=len(OPS))
    # timm's 15 ops, uniform with replacement, each its own id here: 15 counts near 4000 * 2 * 0.5 / 15
    assert (counts[1:] > 0).sum() == 15 and counts[1:].max() < 1.5 * counts[1:].min()
    rotate = plan.params[plan.ops == OP_ID["rotate"]]
    magnitude = np.abs(rotate) / 30 * 10  # back to timm's magnitude: N(9, 0.5) clipped to [0, 10]
    assert abs(np.median(magnitude) - 9.0) < 0.1 and 0.35 < magnitude.std() < 0.55 and magnitude.max() <= 10
    assert 0.4 < (rotate < 0).mean() < 0.6  # random sign
    ta = augment_plan(parse_policy("ta_wide"), 0.0, 3, 2, positions, 64)
    assert set(np.unique(ta.ops)) == {OP_ID[n] for n in OPS if n not in ("invert", "solarize_add")}
    original = augment_plan(parse_policy("original"), 0.0, 3, 2, positions, 64)
    assert original.ops.shape == (4000, 2) and OP_ID["translate_x"] not in original.ops
    jitter = augment_plan(None, 0.4, 3, 2, positions, 64)
    assert jitter.ops.shape == (4000, 0) and jitter.jitter.min() >= 0.6 and jitter.jitter.max() <= 1.4
    assert sorted(np.unique(jitter.jitter_order)) == list(range(6))


def test_trivial_augment_ops_equal_torchvisions_on_the_same_draws():
    """Our ta_wide plan applied by apply_ops equals torchvision.transforms.v2.TrivialAugmentWide pixel for pixel
    when both make the same choice: torchvision's draws are replayed into a plan."""
    image = torch.from_numpy(np.ascontiguousarray(write_photo_arrays()[0])).permute(2, 0, 1)
    ta = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=FILL)
    names = list(ta._AUGMENTATION_SPACE)
    ours_by_tv = {
        "Identity": "identity", "ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x",
        "TranslateY": "translate_y", "Rotate": "rotate", "Brightness": "brightness", "Color": "color",
        "Contrast": "contrast", "Sharpness": "sharpness", "Posterize": "posterize", "Solarize": "solarize",
        "AutoContrast": "auto_contrast", "Equalize": "equalize",
    }  # fmt: skip
    seen = set()
    for trial in range(60):
        torch.manual_seed(trial)
        expected = ta(image)
        torch.manual_seed(trial)  # replay torchvision's draws (forward(): op, bin, sign)
        name = names[int(torch.randint(len(names), ()))]
        fn, signed = ta._AUGMENTATION_SPACE[name]
        magnitudes = fn(31, *image.shape[1:])
        value = 0.0
        if magnitudes is not None:
            value = float(magnitudes[int(torch.randint(31, ()))])
            if signed and torch.rand(()) <= 0.5:
                value = -value
        op = ours_by_tv[name]
        if op in ("brightness", "color", "contrast", "sharpness"):
            value += 1.0
        elif op == "solarize":
            value *= 255.0
        elif op.startswith("translate"):
            value = float(int(value))
        plan = augment_plan(None, 0.0, 0, 0, np.arange(1), 8).row(0)
        plan.ops, plan.params = np.array([OP_ID[op]]), np.array([value])
        assert torch.equal(apply_ops(image, plan, "bilinear", FILL), expected), (name, value)
        seen.add(name)
    assert len(seen) == len(names)


def write_photo_arrays():
    from test_data_helpers import photos

    return [p[::8, ::8] for p in photos().values()]


def test_each_knob_changes_only_what_it_should(photo_root):
    base = epoch(build_loader(cfg_for(photo_root), "train", seed=2), 1)
    plain_val = epoch(build_loader(cfg_for(photo_root), "val"), 0)
    for knob in ({"auto_augment": "rand-m9-mstd0.5-inc1"}, {"random_erasing": 1.0}, {"color_jitter": 0.4}):
        cfg = cfg_for(photo_root, **knob)
        got = epoch(build_loader(cfg, "train", seed=2), 1)
        assert [torch.equal(a[1], b[1]) for a, b in zip(base, got)] == [True] * len(base)  # same samples
        x0, x1 = torch.cat([b[0] for b in base]), torch.cat([b[0] for b in got])
        changed = (x0 != x1).flatten(1).any(1)
        if "auto_augment" in knob:  # exactly the samples whose plan applies an op change
            plan = augment_plan(parse_policy(knob["auto_augment"]), 0.0, 2, 1, np.arange(len(x0)), 32)
            assert torch.equal(changed, torch.from_numpy((plan.ops != 0).any(1))) and 0 < changed.sum() < len(x0)
        elif "random_erasing" in knob:  # only the box changes, and holds its seed's N(0, 1) noise
            boxes = erase_boxes(1.0, 2, 1, np.arange(len(x0)), 32)
            for i, (top, left, h, w, noise_seed) in enumerate(boxes.tolist()):
                assert h > 0
                inside = torch.zeros(32, 32, dtype=torch.bool)
                inside[top : top + h, left : left + w] = True
                assert torch.equal(x1[i][:, ~inside], x0[i][:, ~inside])
                assert torch.equal(x1[i][:, inside].view(3, h, w), erase_noise(noise_seed, 3, h, w))
        else:
            assert changed.all()
        val = epoch(build_loader(cfg, "val"), 0)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(plain_val, val))  # val untouched


@pytest.mark.parametrize(
    "backend, extra",
    [("torchvision", {}), ("torchvision", {"num_workers": 2}), ("dali", {}), ("dali", {"dali_resize": "graph"})],
)
def test_resume_mid_epoch_is_bit_exact_with_everything_on(photo_root, backend, extra):
    knobs = dict(ALL_ON, progressive_sizes=[32, 64], progressive_epochs=[1, 3], **extra)
    loader = build_loader(cfg_for(photo_root, backend, **knobs), "train", seed=7)
    full = epoch(loader, 2)
    assert len(full) == 4 and full[0][0].shape[-1] == 64  # epoch 2 of the ramp 32 -> 64: 48, rounded to 64
    tail = epoch(loader, 2, start=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[2:], strict=True))
    fresh = build_loader(cfg_for(photo_root, backend, **knobs), "train", seed=7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch(fresh, 2, start=1), full[1:], strict=True))
    loader.close()
    fresh.close()


def test_backends_apply_the_same_plan(photo_root):
    """The DALI torch path applies the torchvision backend's ops to the same samples with the same magnitudes: the
    crops differ by decoder rounding only, so the augmented batches stay within a grey level on average."""
    for knobs in ({"auto_augment": "rand-m9-mstd0.5-inc1"}, {"auto_augment": "ta_wide", "color_jitter": 0.3}):
        tv = epoch(build_loader(cfg_for(photo_root, img_size=48, **knobs), "train", seed=4), 0)
        dali = epoch(build_loader(cfg_for(photo_root, "dali", img_size=48, **knobs), "train", seed=4), 0)
        plain = epoch(build_loader(cfg_for(photo_root, "dali", img_size=48), "train", seed=4), 0)
        for (xt, yt), (xd, yd), (xp, _) in zip(tv, dali, plain, strict=True):
            assert torch.equal(yt, yd)
            assert (grey_level_diff(xt, xd, STD) < 1.0).all(), grey_level_diff(xt, xd, STD)
            assert (grey_level_diff(xd, xp, STD) > 1.0).sum() >= 1  # the ops ran


def test_progressive_resizing_schedule_and_val_img_size(photo_root):
    sizes = [train_img_size(224, [160, 224], [2, 6], 32, e) for e in range(9)]
    assert sizes == [160, 160, 160, 192, 192, 192, 224, 224, 224]  # 176 and 208 round half to even: 192
    assert [train_img_size(64, None, None, 32, e) for e in range(3)] == [64, 64, 64]
    knobs = dict(progressive_sizes=[32, 64], progressive_epochs=[0, 2], val_img_size=40)
    for backend, extra in (("torchvision", {}), ("dali", {}), ("dali", {"dali_resize": "graph"})):
        cfg = cfg_for(photo_root, backend, **knobs, **extra)
        loader = build_loader(cfg, "train")
        assert [epoch(loader, e)[0][0].shape[-2:] for e in (0, 1, 2, 5)] == [(32, 32), (64, 64), (64, 64), (64, 64)]
        val = build_loader(cfg, "val")
        assert {x.shape[-1] for x, _ in val} == {40}
        assert {x.shape[-1] for x, _ in build_loader(cfg_for(photo_root, backend, **extra), "val")} == {32}


def test_augmentation_config_errors(photo_root):
    for knobs, match in (
        ({"random_erasing": 1.5}, r"data\.random_erasing=1\.5.*probability"),
        ({"color_jitter": -0.1}, r"data\.color_jitter"),
        ({"repeated_aug": 0}, r"data\.repeated_aug=0.*>= 1"),
        ({"val_img_size": 0}, r"data\.val_img_size=0"),
        ({"progressive_sizes": [32, 64]}, r"progressive_sizes.*progressive_epochs"),
        ({"progressive_sizes": [32, 50], "progressive_epochs": [0, 2]}, r"multiples of 32"),
        ({"progressive_sizes": [32, 64], "progressive_epochs": [3, 2]}, r"progressive_epochs=\[3, 2\]"),
    ):
        with pytest.raises(ValueError, match=match):
            build_loader(cfg_for(photo_root, **knobs), "train")


def test_knobs_compose_from_the_command_line():
    from pathlib import Path

    register_configs()
    configs = Path(__file__).resolve().parents[2] / "configs"
    overrides = [
        "data.auto_augment=rand-m9-mstd0.5-inc1",
        "data.random_erasing=0.25",
        "data.color_jitter=0.4",
        "data.repeated_aug=3",
        "data.val_img_size=224",
        "data.progressive_sizes=[160,192]",
        "data.progressive_epochs=[10,30]",
    ]
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        default = as_data_config(compose(config_name="train").data)
        cfg = as_data_config(compose(config_name="train", overrides=overrides).data)
    assert (default.auto_augment, default.random_erasing, default.color_jitter, default.repeated_aug) == (
        None, 0.0, 0.0, 1,
    )  # fmt: skip
    assert default.val_img_size is None and default.progressive_sizes is None
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.repeated_aug == 3 and cfg.val_img_size == 224
    assert cfg.progressive_sizes == [160, 192] and cfg.progressive_epochs == [10, 30]


def test_noise_folder_smoke(tmp_path):
    """Noise JPEGs of odd sizes go through the strongest settings in both backends."""
    write_noise_split(tmp_path, "train", 12)
    for backend in ("torchvision", "dali"):
        cfg = cfg_for(tmp_path, backend, auto_augment="rand-n4-m10-mstd101", color_jitter=0.5, random_erasing=1.0)
        batches = epoch(build_loader(cfg, "train"), 0)
        assert len(batches) == 3 and all(torch.isfinite(x).all() for x, _ in batches)
