"""Repeated augmentation (data.repeated_aug): count-exact over ranks, repeats on different ranks with different
draws, resumable, the same in both backends."""

from collections import Counter

import numpy as np
import pytest
import torch
from test_data_helpers import write_noise_split

from res2net.data import DataConfig, build_loader
from res2net.data.index import epoch_permutation, train_positions


@pytest.mark.parametrize("n, world_size, repeats", [(50, 1, 3), (50, 2, 3), (50, 4, 3), (64, 4, 4), (7, 3, 2)])
def test_repeated_order_is_count_exact_and_spreads_repeats(n, world_size, repeats):
    shards = [train_positions(n, r, world_size, 5, 2, repeats) for r in range(world_size)]
    assert [len(order) for order, _ in shards] == [n // world_size] * world_size  # same count as without repeats
    positions = np.concatenate([pos for _, pos in shards])
    assert len(set(positions.tolist())) == len(positions)  # every sample its own draws
    images = Counter(np.concatenate([order for order, _ in shards]).tolist())
    perm = epoch_permutation(n, 5, 2)
    assert set(images) <= set(perm[: -(-n // repeats)].tolist()) and max(images.values()) <= repeats
    rank_of = {int(p): r for r, (_, pos) in enumerate(shards) for p in pos}
    for k in range(0, (n // world_size) * world_size - repeats, repeats):  # one image's repeats: positions k..
        ranks = [rank_of[p] for p in range(k, k + repeats) if p in rank_of]
        assert len(set(ranks)) == min(repeats, world_size, len(ranks))
    plain = [train_positions(n, r, world_size, 5, 2) for r in range(world_size)]
    assert np.array_equal(plain[0][1], np.arange(n // world_size))  # repeats=1: today's contiguous blocks
    assert sorted(np.concatenate([o for o, _ in plain]).tolist()) == sorted(perm[: n // world_size * world_size])


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_repeats_land_on_other_ranks_with_other_crops_and_resume(tmp_path, backend):
    write_noise_split(tmp_path, "train", 24)
    cfg = DataConfig(root=str(tmp_path), backend=backend, batch_size=4, num_workers=1 if backend == "dali" else 0,
                     img_size=32, repeated_aug=2)  # fmt: skip
    loaders = [build_loader(cfg, "train", seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]
    batches = []
    for loader in loaders:
        loader.set_epoch(1)
        batches.append([x.clone() for x, _ in loader])
    orders = [train_positions(24, r, 2, 3, 1, 2)[0] for r in range(2)]
    assert np.array_equal(orders[0], orders[1])  # repeats 2 over 2 ranks: rank r's k-th sample is the same image
    x0, x1 = torch.cat(batches[0]), torch.cat(batches[1])
    assert not (x0 == x1).flatten(1).all(1).any()  # ... with its own crop and flip on each rank
    loaders[1].set_epoch(1, 2)
    assert torch.equal(next(iter(loaders[1]))[0], batches[1][2])  # resume
    tv = DataConfig(**{**cfg.__dict__, "backend": "torchvision", "num_workers": 0})
    if backend == "dali":  # the same samples as the torchvision backend, rank by rank
        ref = build_loader(tv, "train", seed=3, rank=1, world_size=2)
        ref.set_epoch(1)
        assert all((a - b).abs().mean() < 0.05 for a, (b, _) in zip(batches[1], ref, strict=True))
