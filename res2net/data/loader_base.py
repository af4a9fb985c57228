"""The Loader protocol every backend follows, and what they share: the epoch's batches, ``len()``, ``set_epoch``."""

from .index import EpochBatches
from .worker_watch import WorkerCrashError

__all__ = ["EpochLoader", "DataReadError", "is_read_error"]


class DataReadError(RuntimeError):
    """A loader could not read or decode a data file: the message names the file(s) and the fix
    (scripts/check_dataset.py). Only this, a dead DataLoader worker and an OS read error count as the data's
    fault (``is_read_error``); any other exception out of a loader is a bug and keeps its own message."""


def is_read_error(err: BaseException) -> bool:
    """Whether ``err`` out of a loader is a data read / decode failure (worth sending the user to
    scripts/check_dataset.py) rather than a bug."""
    return isinstance(err, DataReadError | WorkerCrashError | OSError)


class EpochLoader:
    """Base of the Loader backends and their protocol:

    - ``set_epoch(epoch, start_batch=0)``: the next iteration yields that epoch's batches from ``start_batch`` on;
      earlier batches are skipped without being decoded.
    - ``iter(loader)`` -> ``(images, labels)``: normalized images on ``device`` (NCHW, channels_last memory format if
      asked, ``dtype``), int64 labels on ``device``.
    - ``len(loader)``: batches per epoch on this rank. Train: every rank gets floor(N / world_size) samples of the
      epoch's (seed, epoch) permutation and drops the last partial batch. Val: ceil(shard / batch_size); shards are
      contiguous blocks of the sorted samples whose sizes differ by at most one, so every image is seen exactly once.
    - ``num_classes``, ``classes`` (sorted wnids), ``num_samples`` (samples this rank yields per epoch), ``skipped``
      (undecodable samples met so far); val only: ``paths`` and ``targets`` in iteration order.
    - ``close()``: releases workers / pipelines; idempotent.
    - No global random state: building a Loader, ``set_epoch``, creating an iterator, iterating (whole or part of an
      epoch) and ``close()`` leave ``torch.get_rng_state()``, ``random.getstate()`` and ``np.random.get_state()``
      unchanged (the torchvision DataLoader draws its workers' seed from its own generator, seeded from (seed, epoch,
      rank)), so a resumed run restores the RNG states once, before its first step.

    A torchvision DataLoader worker that dies (OOM killer, decoder crash) raises ``worker_watch.WorkerCrashError`` (a
    RuntimeError) naming the file it was decoding, from ``next()`` or, via torch's SIGCHLD handler, from wherever the
    main thread is at that moment.

    A subclass sets ``_batches`` (index.epoch_batches of this rank) and implements ``_seek(epoch, start_batch)``,
    which ``set_epoch`` calls with validated arguments.
    """

    _batches: EpochBatches

    def __len__(self) -> int:
        return self._batches.num_batches

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return self._batches.num_samples

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {len(self)}, got epoch={epoch}, start_batch={start_batch}"
            )
        self._seek(epoch, start_batch)

    def _seek(self, epoch: int, start_batch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches from ``start_batch`` on."""
        raise NotImplementedError
