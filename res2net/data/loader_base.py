"""What every backend's Loader shares: the epoch's batches, ``len()`` and ``set_epoch`` (see res2net.data)."""

from .index import EpochBatches

__all__ = ["EpochLoader"]


class EpochLoader:
    """Base of the Loader backends. A subclass sets ``_batches`` (index.epoch_batches of this rank) and implements
    ``_seek(epoch, start_batch)``, which ``set_epoch`` calls with validated arguments."""

    _batches: EpochBatches

    def __len__(self) -> int:
        return self._batches.num_batches

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return self._batches.num_samples

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(f"need epoch >= 0 and 0 <= start_batch <= {len(self)}, "
                             f"got epoch={epoch}, start_batch={start_batch}")
        self._seek(epoch, start_batch)

    def _seek(self, epoch: int, start_batch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches from ``start_batch`` on."""
        raise NotImplementedError
