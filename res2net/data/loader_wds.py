"""The two backends on WebDataset shards (``data.format=wds``): the same Loader classes as on folders, with the
samples read from tars instead of files.

torchvision: DataLoader workers read each sample's image bytes with one seek into its shard (shards.MemberReader)
and decode them as on folders; an undecodable sample is skipped as an undecodable file is, named
``<shard>/<key>.<ext>``. DALI: ``fn.readers.webdataset`` reads the rank's samples of the epoch through DALI index
files written per pipeline into a private temporary folder (one per run of consecutive samples of one shard, lines
in the epoch's order: DALI reads an index's samples in the order listed), and the labels come from the shard index
through an external_source; the decode / crop / augment graph is the folder one. Both take their order from
shards.wds_epoch_order and their crops from the sample's epoch position, so they agree sample by sample.
"""

import io
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from .loader_torchvision import TorchvisionLoader, _BatchDataset
from .shards import DALI_INDEX_VERSION, MemberReader, ShardSet, load_shards, resolve_shards, wds_epoch_order

__all__ = ["build_wds_loader", "load_split"]


def load_split(cfg, split: str) -> ShardSet:
    """The shard index of ``split`` ('train' | 'val') from data.train_shards / data.val_shards."""
    key, spec = f"{split}_shards", getattr(cfg, f"{split}_shards")
    if spec is None and split == "val" and isinstance(cfg.train_shards, str) and os.path.isdir(cfg.train_shards):
        key, spec = "train_shards", cfg.train_shards  # a make_shards folder holds both splits
    paths = resolve_shards(spec, split, key)
    return load_shards(paths, list(cfg.wds_image_keys), cfg.wds_label_key)


_TMP_PREFIX = "res2net-wds-idx-"  # + pid: the DALI index folders of a process


def _remove_orphaned_index_folders() -> None:
    """Delete the DALI index folders of processes that no longer exist (a SIGKILL skips the cleanup at close)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name[len(_TMP_PREFIX) :].split("-")[0]
        if not name.startswith(_TMP_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _perm(shards: ShardSet, cfg, seed: int, epoch: int) -> np.ndarray:
    return wds_epoch_order(shards.counts, seed, epoch, cfg.wds_shuffle_in_shard)


class _ShardBatchDataset(_BatchDataset):
    def __init__(self, *args, shards: ShardSet, cfg, **kwargs):
        super().__init__(*args, cfg, **kwargs)
        self.shards, self.shuffle_in_shard = shards, cfg.wds_shuffle_in_shard
        self.reader = MemberReader(shards)

    def epoch_perm(self, epoch: int) -> np.ndarray:
        return wds_epoch_order(self.shards.counts, self.seed, epoch, self.shuffle_in_shard)

    def image_source(self, idx: int):
        return io.BytesIO(self.reader.read(int(idx)))  # the whole image is decoded: one read


class _ShardTorchvisionLoader(TorchvisionLoader):
    def __init__(self, shards: ShardSet, cfg, train: bool, **kwargs):
        self._shards = shards
        super().__init__(shards.samples(), shards.classes, cfg, train, **kwargs)

    def _make_dataset(self, paths, labels, train, cfg, rank, world_size, seed) -> _BatchDataset:
        return _ShardBatchDataset(
            paths, labels, train, batches=self._batches, rank=rank, world_size=world_size, seed=seed,
            shards=self._shards, cfg=cfg,
        )  # fmt: skip


def _dali_loader_class():
    from nvidia.dali import fn

    from .loader_dali import DaliLoader

    class _ShardDaliLoader(DaliLoader):
        def __init__(self, shards: ShardSet, cfg, train: bool, **kwargs):
            self._shards = shards
            self._member = MemberReader(shards)
            self._index_of = None  # sample name -> index, built when an error or a val size check needs it
            _remove_orphaned_index_folders()
            self._tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
            self._builds = 0
            self._lines = None  # _index_lines
            super().__init__(shards.samples(), shards.classes, cfg, train, **kwargs)

        def _epoch_perm(self, epoch: int) -> np.ndarray:
            return _perm(self._shards, self.cfg, self.seed, epoch)

        def _open_sample(self, path: str):
            if self._index_of is None:
                self._index_of = {name: i for i, name in enumerate(self._shards.names.tolist())}
            return self._member.open(self._index_of[path])

        def _fix_hint(self) -> str:
            return (
                "Check the shards with `python scripts/make_shards.py --check --out <shard folder>`, re-make them from "
                "a folder cleaned by scripts/check_dataset.py --fix, or use data.backend=torchvision, which skips them."
            )

        def _reader(self, files: list[str], labels: list[int], indices: np.ndarray):
            """fn.readers.webdataset over index files listing ``indices`` in order, one per run of one shard."""
            shards = self._shards
            shard_of = shards.shard_of[indices]
            cuts = np.flatnonzero(np.diff(shard_of)) + 1
            paths, index_paths = [], []
            for stale in os.listdir(self._tmp):  # the previous pipeline's indexes: it was shut down before this build
                os.unlink(os.path.join(self._tmp, stale))
            self._builds += 1
            lines = self._index_lines()
            for k, run in enumerate(np.split(np.arange(len(indices)), cuts)):
                index_path = os.path.join(self._tmp, f"b{self._builds}-{k}.idx")
                with open(index_path, "w") as f:  # DALI's v1.2 format (shards.dali_index_text), in the epoch's order
                    f.write(f"{DALI_INDEX_VERSION} {len(run)}\n" + "\n".join(lines[indices[run]]) + "\n")
                paths.append(shards.paths[int(shard_of[run[0]])])
                index_paths.append(index_path)
            images = fn.readers.webdataset(
                paths=paths,
                index_paths=index_paths,
                ext=[";".join(self.cfg.wds_image_keys)],
                missing_component_behavior="error",
                random_shuffle=False,
                pad_last_batch=True,
                name="reader",
            )
            return images, fn.external_source(
                source=self._labels_source(np.asarray(labels, np.int32)), batch=True, batch_info=True
            )

        def _index_lines(self) -> np.ndarray:
            """Each sample's line of a DALI index (its image member: ext offset size name), made once."""
            if self._lines is None:
                shards = self._shards
                self._lines = np.array(
                    [
                        f"{ext} {offset} {size} sample{i}.{ext}"  # the name field only labels DALI's messages
                        for i, (ext, offset, size) in enumerate(
                            zip(shards.exts.tolist(), shards.offsets.tolist(), shards.sizes.tolist())
                        )
                    ],
                    dtype=object,
                )
            return self._lines

        def _labels_source(self, labels: np.ndarray):
            """external_source callback: the labels of the reader's batch ``info.iteration``. The reader goes over
            its samples in cycles of ceil(n / batch) batches, padding the last one with its last sample, as here."""
            n, bs = len(labels), self.batch_size
            per_cycle = -(-n // bs)

            def source(info):
                base = (info.iteration % per_cycle) * bs
                return [labels[i : i + 1] for i in np.minimum(np.arange(base, base + bs), n - 1)]

            return source

        def close(self) -> None:
            super().close()
            self._member.close()
            self._cleanup()

    return _ShardDaliLoader


def build_wds_loader(cfg, split: str, *, rank, world_size, seed, device: torch.device, normalizer):
    """The Loader of ``split`` over the shards of data.<split>_shards for data.backend dali | torchvision."""
    shards = load_split(cfg, split)
    common = dict(rank=rank, world_size=world_size, seed=seed, device=device, normalizer=normalizer)
    if cfg.backend == "torchvision":
        return _ShardTorchvisionLoader(shards, cfg, split == "train", **common)
    return _dali_loader_class()(shards, cfg, split == "train", **common)
