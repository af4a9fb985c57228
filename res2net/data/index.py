"""The ImageFolder index of <root>/<split>/<wnid>/*.JPEG and the per-epoch order, sharding and batching that every
backend shares.

Labels are the positions of the class folder names (WordNet ids) in sorted order, as the released checkpoints use.
Train: a (seed, epoch) permutation of the split, cut into equal contiguous blocks per rank. Val: contiguous blocks of
the sorted samples whose sizes differ by at most one, so every image belongs to exactly one rank.
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IMG_EXTENSIONS",
    "class_folders",
    "scan_split",
    "epoch_permutation",
    "train_shard",
    "val_shard",
    "train_positions",
    "EpochBatches",
    "epoch_batches",
]

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_LAYOUT = "<root>/{train,val}/<wnid>/*.JPEG"

log = logging.getLogger(__name__)


def _visible(folder: str, keep) -> list[str]:
    """Sorted names in ``folder`` that ``keep(entry)`` accepts, leaving out hidden ones (.DS_Store, ._x.JPEG,
    .ipynb_checkpoints, a write's .tmp file) and entries that cannot be followed (a symlink loop, a dangling link)."""
    names = []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        try:
            kept = keep(entry)
        except OSError as err:  # is_dir() / is_file() follow links: ELOOP for a loop
            log.warning("skipping %r: %s", entry.path, err)
            continue
        if kept:
            names.append(entry.name)
    return sorted(names)


def class_folders(split_dir: str) -> list[str]:
    """The class folder names of a split, sorted (hidden folders left out)."""
    return _visible(split_dir, lambda e: e.is_dir())


def scan_split(root: str, split: str, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Return ([(path, label), ...] sorted by class then file name, sorted class names).

    ``classes`` fixes the label mapping (e.g. the train split's classes for val); a folder outside it is an error.
    """
    if root is None:
        raise ValueError(
            f"data.root is not set; pass data.root=<folder laid out as {_LAYOUT}> "
            "(scripts/prepare_imagenet.py creates it from the ImageNet archives)"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data root {root!r} is not a directory; expected the layout {_LAYOUT} "
            "(set data.root; scripts/prepare_imagenet.py creates it)"
        )
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder {split_dir!r} does not exist; expected {_LAYOUT}")
    found = class_folders(split_dir)
    if not found:
        raise FileNotFoundError(
            f"split folder {split_dir!r} has no class sub-folders; expected {split_dir}/<wnid>/"
            f"*.JPEG (a flat folder of images is not supported: run scripts/prepare_imagenet.py)"
        )
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{split_dir!r} has class folders {unknown[:5]} that are not among the {len(classes)} expected classes"
            )
    label_of = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for wnid in found:
        class_dir = os.path.join(split_dir, wnid)
        names = _visible(class_dir, lambda e: e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file())
        if not names:
            raise FileNotFoundError(
                f"class folder {class_dir!r} holds no images; expected at least one file "
                f"ending in one of {IMG_EXTENSIONS} (case-insensitive)"
            )
        label = label_of[wnid]
        samples.extend((os.path.join(class_dir, n), label) for n in names)
    return samples, list(classes)


def _check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of range(n) that depends only on (seed, epoch)."""
    _check_seed(seed, epoch)
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def train_shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the epoch permutation that ``rank`` trains on; the same length on every rank (the last
    n % world_size positions, different samples each epoch, are left out)."""
    _check_rank(rank, world_size)
    per_rank = n // world_size
    return rank * per_rank, (rank + 1) * per_rank


def train_positions(
    n: int, rank: int, world_size: int, seed: int, epoch: int, repeats: int = 1, perm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices of this rank in epoch order, their global positions in the epoch: the key of their
    augmentation draws). ``repeats`` = 1: the rank's contiguous block of the epoch permutation. ``repeats`` > 1
    (repeated augmentation, as timm's RASampler): the first ceil(n / repeats) images of the permutation, each
    ``repeats`` times in a row, cut to n and dealt round-robin over the ranks, so consecutive repeats of an image
    go to different ranks (or, on fewer ranks than repeats, to different positions of one) with different draws.
    ``perm``: the epoch's order when it is not epoch_permutation (shards.wds_epoch_order)."""
    if repeats < 1:
        raise ValueError(f"data.repeated_aug must be an integer >= 1, got {repeats}")
    start, stop = train_shard(n, rank, world_size)
    perm = epoch_permutation(n, seed, epoch) if perm is None else perm
    if repeats == 1:
        return perm[start:stop], np.arange(start, stop)
    order = np.repeat(perm[: -(-n // repeats)], repeats)[:n]
    positions = np.arange(rank, n, world_size)[: stop - start]
    return order[positions], positions


def val_shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the sorted val samples for ``rank``: sizes differ by at most one, union = everything once."""
    _check_rank(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class EpochBatches:
    """How one rank's samples of an epoch split into batches. ``start``, ``stop``: the rank's block of the epoch
    order (train) or of the sorted samples (val); ``num_samples``: the samples it yields per epoch (train: whole
    batches only); ``num_batches``: the loader's len()."""

    start: int
    stop: int
    batch_size: int
    num_samples: int
    num_batches: int

    def bounds(self, batch: int) -> tuple[int, int]:
        """[lo, hi) of batch ``batch`` as offsets into the rank's block (the last val batch may be short)."""
        lo = batch * self.batch_size
        return lo, min(lo + self.batch_size, self.num_samples)

    def remaining(self, start_batch: int) -> range:
        """The batch indices an epoch resumed at ``start_batch`` yields."""
        return range(start_batch, self.num_batches)


def epoch_batches(n: int, batch_size: int, rank: int, world_size: int, *, train: bool) -> EpochBatches:
    """The batches of ``rank`` over a split of ``n`` samples: train drops the last partial batch (and needs one
    whole batch), val keeps it so every sample is yielded once."""
    start, stop = (train_shard if train else val_shard)(n, rank, world_size)
    if not train:
        return EpochBatches(start, stop, batch_size, stop - start, -(-(stop - start) // batch_size))
    num_batches = (stop - start) // batch_size
    if num_batches == 0:
        raise ValueError(
            f"rank {rank} of {world_size} gets {stop - start} of the {n} training samples, fewer than "
            f"data.batch_size={batch_size}; lower data.batch_size or add training data"
        )
    return EpochBatches(start, stop, batch_size, num_batches * batch_size, num_batches)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
