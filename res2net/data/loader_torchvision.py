"""PIL decoding in DataLoader workers ("torchvision" backend: the reference the published numbers were measured with).

Each DataLoader item is a whole batch, keyed (epoch, batch index): a worker decodes it into one uint8 NHWC array and
the consumer normalizes it on the device. Augmentation comes from transforms.augmentation_draws, so a batch is
bit-identical for any num_workers and any start_batch; persistent workers follow set_epoch without a restart.
Undecodable files are skipped and counted (see ``_BatchDataset``); a worker that dies raises
``worker_watch.WorkerCrashError`` naming the file it was decoding.
"""

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .augment import TrainAugment
from .index import EpochBatches, epoch_batches, train_positions
from .loader_base import DataReadError, EpochLoader
from .transforms import (
    DRAW_FLIP,
    augmentation_draws,
    center_crop_offset,
    eval_img_size,
    random_resized_crop_box,
    val_resize_size,
    val_resized_shape,
)
from .worker_watch import IDLE, WorkerCrashError, WorkerTable, crash_error, watch_sigchld

__all__ = ["TorchvisionLoader", "decode_val_image", "decode_train_image"]

log = logging.getLogger(__name__)
_PIL_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _open_rgb(path: str) -> Image.Image:
    img = Image.open(path)
    try:
        img.load()  # decodes, and closes the file of a single-frame image
    except Exception:
        img.close()
        raise
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_val_image(path: str, img_size: int, crop_pct: float, interpolation: str = "bilinear") -> np.ndarray:
    """Val transform of one file as uint8 HWC: shorter side to floor(img_size / crop_pct) (PIL, antialiased),
    center crop img_size -- exactly torchvision's Resize(int) + CenterCrop on a PIL image."""
    img = _open_rgb(path)
    new_h, new_w = val_resized_shape(img.height, img.width, val_resize_size(img_size, crop_pct))
    img = img.resize((new_w, new_h), _PIL_INTERP[interpolation])
    top, left = center_crop_offset(new_h, img_size), center_crop_offset(new_w, img_size)
    return np.asarray(img.crop((left, top, left + img_size, top + img_size)))


def decode_train_image(path: str, draws: np.ndarray, img_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """RandomResizedCrop (crop, then resize, as torchvision) + horizontal flip of one file as uint8 HWC, all
    randomness given by ``draws`` (transforms.augmentation_draws)."""
    img = _open_rgb(path)
    top, left, h, w = random_resized_crop_box(draws, img.height, img.width)
    img = img.crop((left, top, left + w, top + h)).resize((img_size, img_size), _PIL_INTERP[interpolation])
    if draws[DRAW_FLIP]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)


class _BatchDataset(torch.utils.data.Dataset):
    """Key (epoch, batch index) -> (uint8 NHWC batch, int64 labels, [(skipped path, reason), ...]).

    An undecodable train sample is replaced by the next decodable one of this rank's epoch order (wrapping),
    augmented with the replaced position's draws, so the batch keeps its size and stays deterministic. An
    undecodable val sample keeps its position (``paths`` / ``targets`` stay aligned, it still counts as one
    evaluated image) as a uniform image of the mean colour, which normalizes to zeros.
    """

    def __init__(
        self,
        paths: np.ndarray,
        labels: np.ndarray,
        train: bool,
        cfg,
        batches: EpochBatches,
        rank: int,
        world_size: int,
        seed: int,
    ):
        # numpy arrays rather than lists of tuples: forked workers do not copy them page by page through refcounts.
        self.paths, self.labels = paths, labels
        self.train, self.batches = train, batches
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.crop_pct, self.interpolation = cfg.crop_pct, cfg.interpolation
        self.val_size = eval_img_size(cfg.img_size, cfg.val_img_size)
        self.repeats, self.augment = cfg.repeated_aug, TrainAugment(cfg, seed)
        self.scale, self.ratio, self.hflip = list(cfg.train_crop_scale), list(cfg.train_crop_ratio), cfg.hflip
        self.fill = np.array([round(255 * m) for m in cfg.mean], dtype=np.uint8)
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None
        self.table: WorkerTable | None = None  # set by the loader when decoding runs in worker processes

    def rank_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices of this rank in iteration order, their positions in the epoch: index.train_positions)."""
        if not self.train:
            order = np.arange(self.batches.start, self.batches.stop)
            return order, order
        if self._order is None or self._order[0] != epoch:
            order, positions = train_positions(
                len(self.paths), self.rank, self.world_size, self.seed, epoch, self.repeats
            )
            self._order = (epoch, order, positions)
        return self._order[1], self._order[2]

    def __getitem__(self, key: tuple[int, int]):
        epoch, batch = key
        order, positions = self.rank_order(epoch)
        lo, hi = self.batches.bounds(batch)
        size = self.augment.img_size(epoch) if self.train else self.val_size
        out = np.empty((hi - lo, size, size, 3), dtype=np.uint8)
        labels = np.empty(hi - lo, dtype=np.int64)
        skipped: list[tuple[str, str]] = []
        if self.train:
            draws = augmentation_draws(self.seed, epoch, positions[lo:hi], self.scale, self.ratio, self.hflip)
            plan = self.augment.plan(epoch, positions[lo:hi])
        slot = self.table.worker_slot() if self.table is not None else None
        try:
            for row, pos in enumerate(range(lo, hi)):
                if self.train:
                    labels[row] = self._decode_train(out[row], order, pos, draws[row], skipped, slot)
                    if plan is not None:
                        out[row] = self.augment.apply_hwc(out[row], plan.row(row))
                else:
                    labels[row] = self._decode_val(out[row], order[pos], skipped, slot)
        finally:
            if slot is not None:
                self.table.busy(slot, IDLE)
        return torch.from_numpy(out), torch.from_numpy(labels), skipped

    def _decode_val(self, dst: np.ndarray, idx: int, skipped: list, slot: int | None) -> int:
        if slot is not None:
            self.table.busy(slot, int(idx))
        try:
            dst[...] = decode_val_image(str(self.paths[idx]), self.val_size, self.crop_pct, self.interpolation)
        except Exception as err:  # any decoder failure: PIL raises OSError, SyntaxError, ValueError, ...
            skipped.append((str(self.paths[idx]), repr(err)))
            dst[...] = self.fill
        return int(self.labels[idx])

    def _decode_train(
        self, dst: np.ndarray, order: np.ndarray, pos: int, draws: np.ndarray, skipped: list, slot: int | None
    ) -> int:
        for step in range(len(order)):
            idx = order[(pos + step) % len(order)]
            if slot is not None:
                self.table.busy(slot, int(idx))
            try:
                dst[...] = decode_train_image(str(self.paths[idx]), draws, dst.shape[0], self.interpolation)
                return int(self.labels[idx])
            except Exception as err:  # any decoder failure, see _decode_val
                skipped.append((str(self.paths[idx]), repr(err)))
        raise DataReadError(
            f"no decodable image among the {len(order)} samples of rank {self.rank}; "
            "run scripts/check_dataset.py on the data root"
        )


def _loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of the DataLoader's own generator for (seed, epoch, rank); touches no global generator."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Yields (epoch, batch) keys from start_batch on; read at every iter(), so persistent workers follow it."""

    def __init__(self, batches: EpochBatches):
        self.batches, self.epoch, self.start = batches, 0, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in self.batches.remaining(self.start)])

    def __len__(self) -> int:
        return len(self.batches.remaining(self.start))


class TorchvisionLoader(EpochLoader):
    """The Loader protocol (loader_base.EpochLoader) over PIL decoding in DataLoader workers."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        cfg,
        train: bool,
        *,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        normalizer,
    ):
        self.classes, self.num_classes = list(classes), len(classes)
        self.train, self.batch_size, self.device, self.normalize = train, cfg.batch_size, device, normalizer
        paths = np.array([p for p, _ in samples])
        labels = np.array([label for _, label in samples], dtype=np.int64)
        self._batches = epoch_batches(len(samples), cfg.batch_size, rank, world_size, train=train)
        self._dataset = _BatchDataset(paths, labels, train, cfg, self._batches, rank, world_size, seed)
        if not train:
            shard = slice(self._batches.start, self._batches.stop)
            self.paths = [str(p) for p in paths[shard]]
            self.targets = [int(t) for t in labels[shard]]
        self._sampler = _EpochBatchSampler(self._batches)
        workers = cfg.num_workers
        # Created before the workers start (they inherit it); names the file a dying worker was decoding.
        self.worker_table = WorkerTable(workers, lambda idx: str(paths[idx])) if workers > 0 else None
        self._dataset.table = self.worker_table
        # The DataLoader draws its workers' base seed from this generator, not from torch's global one, when an
        # iterator is created; __iter__ seeds it from (seed, epoch, rank).
        self._generator = torch.Generator()
        self._loader = torch.utils.data.DataLoader(
            self._dataset,
            batch_size=None,
            sampler=self._sampler,
            num_workers=workers,
            generator=self._generator,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers > 0 else None,
        )
        self.skipped = 0
        self.skipped_paths: list[str] = []

    def _seek(self, epoch: int, start_batch: int) -> None:
        self._sampler.epoch, self._sampler.start = epoch, start_batch

    def __iter__(self):
        if self._loader is None:
            raise RuntimeError("loader is closed")
        dataset = self._dataset
        self._generator.manual_seed(_loader_seed(dataset.seed, self._sampler.epoch, dataset.rank))
        batches = iter(self._loader)
        epoch, batch = self._sampler.epoch, self._sampler.start
        self._sampler.start = 0  # a later iteration without set_epoch repeats the epoch from its first batch
        if self.worker_table is not None:
            watch_sigchld()  # torch installed its SIGCHLD handler when it started the workers
        while True:
            try:
                images, labels, skipped = next(batches)
            except StopIteration:
                return
            except Exception as err:
                if isinstance(err, WorkerCrashError) or self.worker_table is None:
                    raise  # already named by the SIGCHLD path, or no workers
                crash = crash_error(err, [self.worker_table], grace_s=1.0)
                if crash is None:
                    raise
                raise crash from err
            self._report(skipped)
            images = self.normalize(images)
            if self.train:
                lo, hi = self._batches.bounds(batch)
                images = dataset.augment.erase(images, epoch, dataset.rank_order(epoch)[1][lo:hi])
            batch += 1
            yield images, labels.to(self.device, non_blocking=True)

    def _report(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.skipped += 1
            if path not in self.skipped_paths:
                self.skipped_paths.append(path)
                action = "replaced by the next sample" if self.train else "fed as a mean-colour image"
                log.warning(
                    "skipped undecodable image %s (%s); %s. Find such files with scripts/check_dataset.py",
                    path,
                    reason,
                    action,
                )

    def close(self) -> None:
        if self.worker_table is not None:
            self.worker_table.close()
        loader, self._loader = self._loader, None
        # Persistent workers live in the DataLoader's cached iterator; stop them now rather than at GC time.
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
