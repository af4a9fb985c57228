"""The batched device augmentation (TrainAugment.apply_batch, erase_batch) against the per-sample reference
(apply_ops, the torchvision backend's path): every op, both interpolations, within the DALI graph's parity tolerance
(< 0.5 grey levels mean absolute difference per sample); the passes it makes; random erasing's boxes and noise."""

from collections import Counter

import numpy as np
import pytest
import torch
from test_data_helpers import photos

from res2net.data import DataConfig
from res2net.data.augment import (
    GEOMETRIC,
    OP_ID,
    OPS,
    TrainAugment,
    apply_ops,
    augment_plan,
    batch_passes,
    erase_batch,
    erase_boxes,
    erase_noise,
    parse_policy,
)

# Parameters per op that reach the interesting ranges (both signs, edge values): the plan's units (augment.OPS).
VALUES = {
    "identity": [0.0],
    "auto_contrast": [0.0],
    "equalize": [0.0],
    "invert": [0.0],
    "rotate": [-30.0, 13.5, 135.0],
    "posterize": [0, 2, 4, 8],
    "solarize": [0.0, 128.0, 200.5, 256.0],
    "solarize_add": [0, 30, 110],
    "color": [0.1, 0.55, 1.9],
    "contrast": [0.1, 1.4, 1.99],
    "brightness": [0.01, 0.7, 1.9],
    "sharpness": [0.1, 1.0, 1.9],
    "shear_x": [-0.3, 0.99],
    "shear_y": [0.3, -0.99],
    "translate_x": [-14.4, 9.0],
    "translate_y": [14.4, -3.0],
}


def images(n, size=40, seed=0):
    """n real photo crops (uint8 NHWC), varied: some dark, some flat, to reach every branch."""
    steps = {k: min(p.shape[:2]) // size for k, p in photos().items()}
    pics = [np.ascontiguousarray(p[:: steps[k], :: steps[k]][:size, :size]) for k, p in photos().items()]
    out = np.stack([pics[i % len(pics)] for i in range(n)])
    out[1::5] //= 4  # dark
    out[2::7] = 77  # flat: auto_contrast and equalize leave it
    return torch.from_numpy(out)


def augmenter(interpolation, **kw):
    cfg = DataConfig(img_size=40, interpolation=interpolation, auto_augment="rand-m9", **kw)
    return TrainAugment(cfg, seed=0)


def reference(aug, batch, plan):
    return torch.stack(
        [
            apply_ops(x.permute(2, 0, 1), plan.row(i), aug.interpolation, aug.fill).permute(1, 2, 0)
            for i, x in enumerate(batch)
        ]
    )


def mean_abs(a, b):
    return (a.float() - b.float()).abs().mean(dim=(1, 2, 3))


def op_plan(n, slots):
    """A plan of n samples whose slots hold the given (op, value) lists, cycled over the samples."""
    plan = augment_plan(None, 0.0, 0, 0, np.arange(n), 40)
    plan.ops = np.zeros((n, len(slots)), dtype=np.int32)
    plan.params = np.zeros((n, len(slots)))
    for k, choices in enumerate(slots):
        for i in range(n):
            op, value = choices[(i * (k + 1) + k) % len(choices)]
            plan.ops[i, k], plan.params[i, k] = OP_ID[op], value
    return plan


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("op", OPS)
def test_each_op_batched_equals_the_per_sample_reference(op, interpolation):
    """One op at several parameters, mixed with identity rows, in a batch: within 0.5 grey levels per sample of the
    reference, and the identity rows untouched."""
    choices = [(op, v) for v in VALUES[op]] + [("identity", 0.0)]
    plan = op_plan(12, [choices])
    aug = augmenter(interpolation)
    batch = images(12)
    expected = reference(aug, batch, plan)
    got = aug.apply_batch(batch.clone(), plan)
    diffs = mean_abs(got, expected)
    assert (diffs < 0.5).all(), (op, diffs)
    if op not in GEOMETRIC:  # pointwise and per-image ops: the same integer arithmetic
        assert diffs.max() < 0.05, diffs
    identity = plan.ops[:, 0] == 0
    assert torch.equal(got[identity], batch[identity])
    if op not in ("identity",):
        changed = (got != batch).flatten(1).any(1)
        assert changed[~identity].any()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-n3-m10-mstd101", "ta_wide", "original"])
def test_policies_with_jitter_batched_equal_the_reference(policy, interpolation):
    """Real plans (the presets' strings, slots in sequence, colour jitter in its drawn order) on 32 samples."""
    aug = augmenter(interpolation, color_jitter=0.4)
    aug.policy = parse_policy(policy)
    plan = aug.plan(3, np.arange(100, 132))
    batch = images(32)
    expected = reference(aug, batch, plan)
    got = aug.apply_batch(batch.clone(), plan)
    diffs = mean_abs(got, expected)
    assert (diffs < 0.5).all(), diffs
    assert (got != batch).flatten(1).any(1).all()  # jitter changes every sample


def test_each_op_type_of_each_slot_makes_one_pass():
    """The passes of a plan: per slot at most one per op type drawn there (the geometric ones one affine), jitter
    at most one per (position, adjustment); their count does not depend on the batch size."""
    policy = parse_policy("rand-m9-mstd0.5-inc1")
    counts = []
    for n in (8, 256, 2048):
        plan = augment_plan(policy, 0.4, 0, 0, np.arange(n), 64)
        passes = batch_passes(plan, 64, 64).passes
        per_op = Counter(p.op for p in passes)
        assert per_op["affine"] <= 2 and all(
            per_op[op] <= 2 for op in per_op if op not in ("brightness", "contrast", "color")
        )
        assert all(per_op[op] <= 2 + 3 for op in ("brightness", "contrast", "color"))  # 2 slots + 3 jitter positions
        counts.append(len(passes))
        # 2 slots x (1 affine + 10 other op types) + 3 positions x 3 adjustments
        assert len(passes) <= 2 * 11 + 9
    assert counts[1] == counts[2] == 2 * 11 + 9  # with enough samples every pass is there, and no more


def test_random_erasing_in_one_go():
    """erase_batch writes each box's counter-based noise and nothing else, for any dtype and memory format; the
    noise is N(0, 1) and depends only on the box's seed."""
    n, size = 64, 32
    boxes = erase_boxes(0.5, 3, 1, np.arange(n), size)
    assert 0 < (boxes[:, 2] > 0).sum() < n
    base = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    for dtype, fmt in ((torch.float32, torch.contiguous_format), (torch.float16, torch.channels_last)):
        x = base.to(dtype).contiguous(memory_format=fmt)
        out = erase_batch(x.clone(memory_format=fmt), boxes)
        for i, (top, left, h, w, seed) in enumerate(boxes.tolist()):
            inside = torch.zeros(size, size, dtype=torch.bool)
            inside[top : top + h, left : left + w] = True
            assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
            if h:
                assert torch.equal(out[i][:, inside].view(3, h, w), erase_noise(seed, 3, h, w).to(dtype))
    noise = erase_noise(12345, 3, 200, 200)
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01 and abs((noise**3).mean()) < 0.03
    assert abs(torch.corrcoef(torch.stack([noise.flatten()[:-1], noise.flatten()[1:]]))[0, 1]) < 0.01
    assert not torch.equal(erase_noise(12346, 3, 8, 8), erase_noise(12345, 3, 8, 8))
    assert torch.equal(erase_noise(2**52 + 5, 3, 8, 8), erase_noise(2**52 + 5, 3, 8, 8))
