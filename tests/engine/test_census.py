"""The CPU op census (res2net/engine/census.py) and what it shows: every preset's steady-state training step has no
host read; the batched augmentation issues a bounded number of ops and Python-data tensors whatever the batch
size (the per-sample reference does not); LAMB's ops do not grow with the number of parameter tensors."""

import numpy as np
import pytest
import torch
from torch import nn

from res2net.data import DataConfig
from res2net.data.augment import TrainAugment, apply_ops, batch_passes
from res2net.data.transforms import Normalizer
from res2net.engine.census import Census, count, preset_census, training_presets
from res2net.engine.optim import Lamb

# Per pass of apply_batch at most ~24 ops (slicing the packed tensor, casts, gather, the op, scatter); 31 passes at most
# for two RandAugment slots and colour jitter, plus the packed copy and random erasing.
AUGMENT_BOUND = 31 * 24 + 60


def test_census_counts_host_reads_and_python_data():
    x = torch.arange(6.0)
    with Census() as census:
        x.sum().item()
        bool(x.max() > 1)
        x.nonzero()
        x[x > 2]  # boolean mask: a nonzero underneath
        torch.repeat_interleave(torch.tensor([1, 2]))  # output size from the data
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)  # given: no read
        torch.from_numpy(np.arange(3))
        x.mul(2).add_(1)
    counts = census.counts
    assert counts.host_reads == 5, counts.reads()
    assert counts.python_tensors == 2 and counts.by_op["lift_fresh"] == 2
    assert counts.by_op["mul"] == 1 and counts.ops >= 12


def augment_census(aug: TrainAugment, batch: int, size: int = 32, batched: bool = True):
    positions = np.arange(batch)
    plan = aug.plan(0, positions)
    images = torch.randint(
        0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    normalize = Normalizer(aug_cfg().mean, aug_cfg().std, torch.device("cpu"), torch.float32, False)

    def batched_path():
        return aug.erase(normalize(aug.apply_batch(images.clone(), plan)), 0, positions)

    def per_sample():
        return [apply_ops(x.permute(2, 0, 1), plan.row(i), aug.interpolation, aug.fill) for i, x in enumerate(images)]

    return count(batched_path if batched else per_sample)[1], len(batch_passes(plan, size, size).passes)


def aug_cfg(**kw):
    base = dict(img_size=32, interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4)
    return DataConfig(**{**base, "random_erasing": 0.25, **kw})


@pytest.mark.parametrize(
    "policy",
    [
        "rand-m9-mstd0.5-inc1",
        pytest.param("ta_wide", marks=pytest.mark.slow),
        pytest.param("original", marks=pytest.mark.slow),
    ],
)
def test_batched_augmentation_ops_do_not_grow_with_the_batch(policy):
    aug = TrainAugment(aug_cfg(auto_augment=policy), seed=0)
    small, small_passes = augment_census(aug, 8)
    large, large_passes = augment_census(aug, 256)
    assert small.host_reads == large.host_reads == 0, large.reads()
    assert large.ops <= AUGMENT_BOUND and large.ops <= 24 * large_passes + 60, (large.ops, large_passes)
    assert small.python_tensors <= 2 and large.python_tensors <= 2  # the packed parameters, the erasing boxes
    reference, _ = augment_census(aug, 64, batched=False)
    assert reference.ops > 2 * large.ops  # the per-sample path: ops per sample (what the census is there to catch)


def two_group_model(depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(depth)])


def test_lamb_ops_do_not_grow_with_the_number_of_parameter_tensors():
    counts = []
    for depth in (2, 12):
        model = two_group_model(depth)
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.02},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        opt = Lamb(groups, lr=1e-3)
        for _ in range(3):  # the first step builds the moments and the flat buffers
            for p in params:
                p.grad = torch.randn_like(p)
            _, step = count(opt.step)
        counts.append(step)
    assert counts[0].host_reads == counts[1].host_reads == 0
    assert counts[0].python_tensors == counts[1].python_tensors == 0
    assert counts[0].ops == counts[1].ops, (counts[0].by_op, counts[1].by_op)


AUGMENTING = ["fast", "rsb_a1", "rsb_a2", "rsb_a3", "tv_recipe"]


def test_the_presets_cover_every_training_preset():
    presets = training_presets()
    assert set(AUGMENTING) <= set(presets) and not any(p.startswith(("ablation_", "debug", "demo")) for p in presets)


@pytest.mark.slow
@pytest.mark.parametrize("preset", AUGMENTING)
def test_preset_step_has_no_host_read_and_bounded_augmentation(preset):
    """Each preset's knobs on (its augmentation, mixup / CutMix, loss, optimizer, EMA), batch 8 and 256: no host
    read anywhere in the step; augmentation ops under a bound independent of the batch; Python-data tensors the
    same few per batch; the model step's ops the same for both sizes."""
    small, large = preset_census(preset, 8), preset_census(preset, 256)
    for census in (small, large):
        assert census.total.host_reads == 0, (preset, census.total.reads())
        assert census.augment.ops <= AUGMENT_BOUND and census.augment.python_tensors <= 2
        assert census.mixup.python_tensors <= 2 and census.step.python_tensors == 0
    assert small.step.ops == large.step.ops and small.mixup.ops == large.mixup.ops


@pytest.mark.slow
def test_benchmark_prints_the_census_per_preset(capsys):
    from scripts import benchmark

    assert benchmark.main(["--census", "--presets", "rsb_a3", "--census-batch", "8", "16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| rsb_a3 |")]
    assert len(rows) == 2 and rows[0].split("|")[6].strip() == "0"  # host reads
    assert benchmark.main(["--census", "--presets", "nope"]) == 2
    assert "not training presets" in capsys.readouterr().err
