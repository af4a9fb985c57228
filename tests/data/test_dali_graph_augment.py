"""data.auto_augment / data.color_jitter on the DALI 'graph' path (data.dali_resize=graph: the GPU default, run here
with CPU decoding, device_id=None): the graph ships resized, flipped uint8 crops and augment.TrainAugment.apply_batch
applies the torchvision backend's plan to them in torch. Builds, resumes bit-exactly, applies the same plan per sample
as the torchvision backend, and stays within the graph's resize tolerance of it."""

import numpy as np
import pytest
import torch
from test_data_helpers import grey_level_diff, write_photo_split

from res2net.data import DataConfig, build_loader
from res2net.data.augment import TrainAugment

pytest.importorskip("nvidia.dali")
STD = DataConfig().std
KNOBS = dict(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4)


def cfg_for(root, backend="dali", **kw) -> DataConfig:
    base = dict(root=str(root), backend=backend, batch_size=4, img_size=48)
    base["num_workers"] = 0 if backend == "torchvision" else 1
    if backend == "dali":
        base["dali_resize"] = "graph"
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photo_split(root, "train", copies=2, shrink=4)
    return root


def epoch(loader, e, start=0):
    loader.set_epoch(e, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_graph_path_accepts_pixel_ops(root):
    """The old code refused them at construction ('not in the DALI graph yet')."""
    loader = build_loader(cfg_for(root, **KNOBS), "train", seed=1)
    assert loader.decoder == "cpu" and loader.resize == "graph" and loader._graph_uint8
    loader.close()
    for knobs in ({"auto_augment": "ta_wide"}, {"auto_augment": "original"}, {"color_jitter": 0.3}):
        build_loader(cfg_for(root, **knobs), "train").close()
    assert not build_loader(cfg_for(root), "train")._graph_uint8  # without pixel ops the graph still normalizes


def test_graph_path_with_pixel_ops_builds_and_yields_batches_in_any_layout(root):
    loader = build_loader(cfg_for(root, **KNOBS), "train", seed=1)
    batches = epoch(loader, 0)
    assert len(batches) == len(loader) == 4
    for x, y in batches:
        assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32 and torch.isfinite(x).all() and len(y) == 4
    for channels_last, dtype in ((True, torch.float32), (True, torch.float16), (False, torch.bfloat16)):
        other = build_loader(cfg_for(root, **KNOBS), "train", seed=1, channels_last=channels_last, dtype=dtype)
        x = epoch(other, 0, start=3)[0][0]
        assert x.dtype == dtype
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(x, batches[3][0].to(dtype))  # the Normalizer's values, cast
        other.close()
    loader.close()


def test_graph_path_with_pixel_ops_resumes_bit_exactly(root):
    knobs = dict(KNOBS, random_erasing=0.5, repeated_aug=2)
    loader = build_loader(cfg_for(root, **knobs), "train", seed=7)
    full = epoch(loader, 2)
    assert len(full) == 4
    for start in (1, 3):
        tail = epoch(loader, 2, start)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[start:], strict=True))
    fresh = build_loader(cfg_for(root, num_workers=2, **knobs), "train", seed=7)  # any thread count
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch(fresh, 2, 2), full[2:], strict=True))
    assert not torch.equal(epoch(loader, 3)[0][0], full[0][0])
    loader.close()
    fresh.close()


def test_graph_path_applies_the_torchvision_backends_plan(root, monkeypatch):
    """Per sample the plan the graph path applies is the one the torchvision backend applies (recorded from
    TrainAugment.apply_batch / apply_hwc), and the augmented batches stay within the graph-vs-torchvision resize
    tolerance (0.5 grey levels, tests/data/test_data_dali.py) while differing from the unaugmented graph output."""
    applied = {"batch": [], "hwc": []}
    apply_batch, apply_hwc = TrainAugment.apply_batch, TrainAugment.apply_hwc

    def record_batch(self, images, plan):
        applied["batch"] += [plan.row(i) for i in range(len(images))]
        return apply_batch(self, images, plan)

    def record_hwc(self, image, plan):
        applied["hwc"].append(plan)
        return apply_hwc(self, image, plan)

    monkeypatch.setattr(TrainAugment, "apply_batch", record_batch)
    monkeypatch.setattr(TrainAugment, "apply_hwc", record_hwc)
    graph = epoch(build_loader(cfg_for(root, **KNOBS), "train", seed=4), 1)
    tv = epoch(build_loader(cfg_for(root, "torchvision", **KNOBS), "train", seed=4), 1)
    plain = epoch(build_loader(cfg_for(root), "train", seed=4), 1)
    assert len(applied["batch"]) == len(applied["hwc"]) == 16
    for a, b in zip(applied["batch"], applied["hwc"], strict=True):
        assert np.array_equal(a.ops, b.ops) and np.array_equal(a.params, b.params)
        assert np.array_equal(a.jitter, b.jitter) and a.jitter_order == b.jitter_order
    assert sum(int((p.ops != 0).any()) for p in applied["batch"]) > 0  # some auto_augment op ran
    for (xg, yg), (xt, yt), (xp, _) in zip(graph, tv, plain, strict=True):
        assert torch.equal(yg, yt)
        diffs = grey_level_diff(xg, xt, STD)
        assert (diffs < 0.5).all(), diffs.round(3)
        assert (grey_level_diff(xg, xp, STD) > 1.0).sum() >= 1  # the ops ran


def test_both_dali_paths_augment_with_apply_batch(root, monkeypatch):
    calls = []
    apply_batch = TrainAugment.apply_batch

    def spy(self, images, plan):
        calls.append((images.dtype, tuple(images.shape)))
        return apply_batch(self, images, plan)

    monkeypatch.setattr(TrainAugment, "apply_batch", spy)
    for resize in ("graph", "torch"):
        calls.clear()
        epoch(build_loader(cfg_for(root, dali_resize=resize, **KNOBS), "train"), 0)
        assert calls == [(torch.uint8, (4, 48, 48, 3))] * 4, resize
