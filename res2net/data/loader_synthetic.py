"""Synthetic backend: one batch of random images made once on the device and yielded again and again, so a
benchmark measures the model alone. Follows the Loader protocol, including val sharding and fake paths."""

import torch

from .index import epoch_batches
from .loader_base import EpochLoader
from .transforms import eval_img_size

__all__ = ["SyntheticLoader"]


class SyntheticLoader(EpochLoader):
    def __init__(
        self,
        cfg,
        train: bool,
        *,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        channels_last: bool,
        dtype: torch.dtype,
    ):
        self.num_classes = cfg.synthetic_num_classes
        if self.num_classes < 1:
            raise ValueError(f"data.synthetic_num_classes must be >= 1, got {self.num_classes}")
        self.classes = [f"class{i:04d}" for i in range(self.num_classes)]
        self.batch_size, self.train = cfg.batch_size, train
        size = cfg.synthetic_train_size if train else cfg.synthetic_val_size
        self._batches = epoch_batches(size, self.batch_size, rank, world_size, train=train)
        if not train:
            start, stop = self._batches.start, self._batches.stop
            self.paths = [f"synthetic/val/{i:08d}.JPEG" for i in range(start, stop)]
            self.targets = [i % self.num_classes for i in range(start, stop)]
        gen = torch.Generator().manual_seed(seed + rank)
        size = cfg.img_size if train else eval_img_size(cfg.img_size, cfg.val_img_size)
        images = torch.randn(self.batch_size, 3, size, size, generator=gen).to(device, dtype)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._images = images.contiguous(memory_format=fmt)
        if train:
            self._labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen).to(device)
        else:
            self._labels = torch.tensor(self.targets, dtype=torch.int64, device=device)
        self._start = 0
        self.skipped = 0

    def _seek(self, epoch: int, start_batch: int) -> None:
        self._start = start_batch

    def __iter__(self):
        start, self._start = self._start, 0
        for b in self._batches.remaining(start):
            if self.train:
                yield self._images, self._labels
            else:
                lo, hi = self._batches.bounds(b)
                yield self._images[: hi - lo], self._labels[lo:hi]

    def close(self) -> None:
        self._images = self._labels = None
