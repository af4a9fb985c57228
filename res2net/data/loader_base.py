"""What every backend's Loader shares: ``len()`` and the validation of ``set_epoch`` (see res2net.data)."""

__all__ = ["EpochLoader"]


class EpochLoader:
    """Base of the Loader backends. A subclass sets ``_num_batches`` (batches per epoch on this rank) and implements
    ``_seek(epoch, start_batch)``, which ``set_epoch`` calls with validated arguments."""

    _num_batches: int

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= self._num_batches:
            raise ValueError(f"need epoch >= 0 and 0 <= start_batch <= {self._num_batches}, "
                             f"got epoch={epoch}, start_batch={start_batch}")
        self._seek(epoch, start_batch)

    def _seek(self, epoch: int, start_batch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches from ``start_batch`` on."""
        raise NotImplementedError
