"""NVIDIA DALI backend: the same train / val semantics as the torchvision backend, decoded by DALI.

Order and sharding: each rank's file list for the epoch (the same (seed, epoch) permutation and shard as the
torchvision backend; val: the same contiguous block) is handed to ``fn.readers.file(files=..., labels=...)``
without shuffling, and the pipeline is rebuilt at the start of every iteration with the files from
``start_batch * batch_size`` on. Each rank reads only its own files, so no sample is padded in from another rank;
the reader pads the last val batch by repeating its last file and the loader trims that padding off, so every image
counts exactly once.

Augmentation: no DALI random operator is used. An external_source feeds each sample's draws, computed in Python
from (seed, epoch, global position in the epoch order) exactly as the torchvision backend computes them
(transforms.augmentation_draws); the graph turns them into torchvision's RandomResizedCrop box with the same float64
arithmetic (transforms.random_resized_crop_box), decodes only that region (decoders.image_slice, a fused ROI
decoder), resizes and flips. So a batch depends only on (seed, epoch, batch index): a mid-epoch resume
(start_batch > 0) gives bit-identical batches, for any thread count, and the crops and flips are the same ones the
torchvision backend picks (the pixels then differ by the decoders' and resizers' rounding, ~0.2 grey levels).
Ranks differ because their positions differ; no per-rank DALI seed is needed.

Decoding: 'cpu' (libjpeg-turbo, DALI CPU-only mode with device_id=None) when the loader's device is the CPU,
'mixed' (nvJPEG, fancy upsampling as on the CPU) when it is CUDA; resizing, cropping and flipping then run where the
decoded images are. Nothing else differs between the two paths. EXIF orientation is ignored, as PIL does.

Val geometry is computed in the graph from the encoded image's shape, with integer arithmetic that reproduces
torchvision exactly (DALI's own resize_shorter would round the long side where torchvision truncates, and its
center crop would round the offset differently): long side = short * long // short_in, offset =
round-half-to-even((size - crop) / 2).

Undecodable files: DALI cannot skip a sample, so a file that its decoder rejects stops the epoch with an error that
names the batch's files and points to scripts/check_dataset.py (which finds and fixes them beforehand) and to the
torchvision backend (which skips them).
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from nvidia.dali import math as dmath

from .index import train_positions, val_shard
from .loader_base import EpochLoader
from .transforms import (DRAW_AREA, DRAW_ASPECT, DRAW_FLIP, DRAW_LEFT, DRAW_RATIO_MAX, DRAW_RATIO_MIN, DRAW_TOP,
                         RRC_ATTEMPTS, augmentation_draws, val_resize_size)

__all__ = ["DaliLoader", "resolve_decoder"]


def resolve_decoder(choice: str, device: torch.device) -> str:
    """'cpu' or 'mixed' for data.dali_decoder = auto | cpu | mixed and the loader's device."""
    if choice == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    if choice == "mixed":
        if not torch.cuda.is_available():
            raise RuntimeError("data.dali_decoder='mixed' decodes on a CUDA GPU, but CUDA is not available here; "
                               "use data.dali_decoder=cpu (or auto)")
        if device.type != "cuda":
            raise RuntimeError(f"data.dali_decoder='mixed' puts batches on the GPU, but the loader's device is "
                               f"{device}; pass a CUDA device or use data.dali_decoder=cpu")
    return choice


def _round_half_even_half(d):
    """round(d / 2) with Python's round-half-to-even, for non-negative integer DALI nodes."""
    q = d // 2
    return q + (d - 2 * q) * (q - 2 * (q // 2))


def _suspects(files: Sequence[str]) -> List[str]:
    """The files of a failed batch that PIL cannot decode either (all of them when PIL decodes every one)."""
    from PIL import Image

    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception:  # any decoder failure marks the file
            bad.append(path)
    return bad or list(files)


def _crop_box_graph(draws, height, width):
    """transforms.random_resized_crop_box as DALI arithmetic on per-sample draws and (H, W) nodes:
    (top, left, crop_h, crop_w). The 10 attempts are evaluated as one vector; the first that fits has the highest
    rank and is picked with two max-reductions. Expressions are written out rather than shared so that DALI fuses
    each into one operator (a per-batch cost of a few ms instead of hundreds of tiny operators)."""
    def round_half_up(x):
        return dmath.floor(x + 0.5)

    area, aspect = draws[DRAW_AREA.start:DRAW_AREA.stop], draws[DRAW_ASPECT.start:DRAW_ASPECT.stop]
    ratio_min, ratio_max = draws[DRAW_RATIO_MIN], draws[DRAW_RATIO_MAX]
    # Reductions take no float64, and the sides are whole numbers: int32.
    w = fn.cast(round_half_up(dmath.sqrt(area * (height * width) * aspect)), dtype=types.INT32)
    h = fn.cast(round_half_up(dmath.sqrt(area * (height * width) / aspect)), dtype=types.INT32)
    rank = types.Constant(np.arange(RRC_ATTEMPTS, 0, -1, dtype=np.int32), dtype=types.INT32)
    score = (w > 0) * (w <= width) * (h > 0) * (h <= height) * rank
    best = fn.reductions.max(score)  # 0: no attempt fits -> the fallback center crop
    chosen = score == best
    crop_w = ((best > 0) * fn.reductions.max(w * chosen)
              + (best == 0) * ((width / height < ratio_min) * width
                               + (width / height > ratio_max) * round_half_up(height * ratio_max)
                               + (width / height >= ratio_min) * (width / height <= ratio_max) * width))
    crop_h = ((best > 0) * fn.reductions.max(h * chosen)
              + (best == 0) * ((width / height < ratio_min) * round_half_up(width / ratio_min)
                               + (width / height > ratio_max) * height
                               + (width / height >= ratio_min) * (width / height <= ratio_max) * height))
    top = ((best > 0) * dmath.floor(draws[DRAW_TOP] * (height - crop_h + 1))
           + (best == 0) * dmath.floor((height - crop_h) / 2))
    left = ((best > 0) * dmath.floor(draws[DRAW_LEFT] * (width - crop_w + 1))
            + (best == 0) * dmath.floor((width - crop_w) / 2))
    return top, left, crop_h, crop_w


class DaliLoader(EpochLoader):
    """The Loader protocol (see res2net.data) over a DALI pipeline rebuilt per epoch."""

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], cfg, train: bool, *, rank: int,
                 world_size: int, seed: int, device: torch.device, normalizer):
        self.classes, self.num_classes = list(classes), len(classes)
        self.cfg, self.train, self.batch_size = cfg, train, cfg.batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.normalize = normalizer
        self.decoder = resolve_decoder(cfg.dali_decoder, device)
        self._paths = np.array([p for p, _ in samples])
        self._labels = np.array([l for _, l in samples], dtype=np.int32)
        if train:
            n_rank = len(samples) // world_size
            self._num_batches = n_rank // self.batch_size
            if self._num_batches == 0:
                raise ValueError(f"rank {rank} of {world_size} gets {n_rank} training samples, fewer than "
                                 f"data.batch_size={self.batch_size}; lower the batch size or add data")
            self.num_samples = self._num_batches * self.batch_size
        else:
            start, stop = val_shard(len(samples), rank, world_size)
            self._num_batches = -(-(stop - start) // self.batch_size)
            self.num_samples = stop - start
            self.paths = [str(p) for p in self._paths[start:stop]]
            self.targets = [int(t) for t in self._labels[start:stop]]
        self.epoch, self._start = 0, 0
        self.skipped = 0  # DALI never skips: an undecodable file raises (see the module docstring)
        self._pipe = None

    def _seek(self, epoch: int, start_batch: int) -> None:
        self.epoch, self._start = epoch, start_batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Sample indices this rank reads in ``epoch``, in order (whole batches only for train)."""
        if self.train:
            order, _ = train_positions(len(self._paths), self.rank, self.world_size, self.seed, epoch)
            return order[: self.num_samples]
        start, stop = val_shard(len(self._paths), self.rank, self.world_size)
        return np.arange(start, stop)

    def __iter__(self):
        start, self._start = self._start, 0  # a later iteration without set_epoch repeats the epoch from batch 0
        indices = self.epoch_indices(self.epoch)[start * self.batch_size:]
        if len(indices) == 0:
            return
        self._release()
        files = [str(p) for p in self._paths[indices]]
        self._pipe = self._build_pipeline(files, self._labels[indices].tolist(), start)
        for b in range(-(-len(files) // self.batch_size)):
            real = min(self.batch_size, len(files) - b * self.batch_size)
            try:
                images, labels = self._pipe.run()
            except RuntimeError as err:
                batch_files = files[b * self.batch_size: b * self.batch_size + real]
                self._release()
                raise RuntimeError(
                    f"DALI failed on batch {start + b} of epoch {self.epoch} (rank {self.rank}); undecodable "
                    f"file(s): {_suspects(batch_files)}\n{err}\nFind such files with "
                    f"`python scripts/check_dataset.py {self.cfg.root}` (--fix re-encodes them), or use "
                    "data.backend=torchvision, which skips them.") from err
            images, labels = self._to_torch(images, labels)
            yield self.normalize(images[:real]), labels[:real].to(self.device, non_blocking=True)
        self._release()

    def _to_torch(self, images, labels) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.from_numpy(labels.as_array().reshape(-1).astype(np.int64))
        if self.decoder == "cpu":
            return torch.from_numpy(images.as_array()), labels
        from nvidia.dali.plugin.pytorch import feed_ndarray
        tensor = images.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out, labels

    def _draws_source(self, start_batch: int):
        """external_source callback: the augmentation draws of pipeline iteration i, i.e. of the samples at global
        positions first + (start_batch + i) * batch_size + j -- the same values the torchvision backend uses."""
        _, first = train_positions(len(self._paths), self.rank, self.world_size, self.seed, self.epoch)
        first += start_batch * self.batch_size
        seed, epoch, cfg = self.seed, self.epoch, self.cfg

        def draws(info) -> np.ndarray:
            base = first + info.iteration * self.batch_size
            return augmentation_draws(seed, epoch, np.arange(base, base + self.batch_size), cfg.train_crop_scale,
                                      cfg.train_crop_ratio, cfg.hflip)
        return draws

    def _build_pipeline(self, files: List[str], labels: List[int], start_batch: int) -> Pipeline:
        cfg = self.cfg
        interp = types.INTERP_LINEAR if cfg.interpolation == "bilinear" else types.INTERP_CUBIC
        device_id = None
        if self.decoder == "mixed":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
                        prefetch_queue_depth=cfg.prefetch)
        decoder_args = dict(device=self.decoder, output_type=types.RGB, adjust_orientation=False)
        if self.decoder == "mixed":
            decoder_args["jpeg_fancy_upsampling"] = True
        with pipe:
            jpegs, label_node = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                                pad_last_batch=True, name="reader")
            if self.train:
                draws = fn.external_source(source=self._draws_source(start_batch), batch=True, batch_info=True,
                                           dtype=types.FLOAT64, ndim=1)
                images = self._train_graph(jpegs, decoder_args, interp, draws)
            else:
                images = self._val_graph(jpegs, decoder_args, interp)
            pipe.set_outputs(images, label_node)
        pipe.build()
        return pipe

    def _train_graph(self, jpegs, decoder_args, interp, draws):
        """RandomResizedCrop from the per-sample ``draws`` (see transforms.random_resized_crop_box, which this
        mirrors in float64 graph arithmetic), decoded as a region of interest, resized, flipped."""
        shape = fn.peek_image_shape(jpegs, dtype=types.INT64, adjust_orientation=False)
        height, width = fn.cast(shape[0], dtype=types.FLOAT64), fn.cast(shape[1], dtype=types.FLOAT64)
        top, left, crop_h, crop_w = _crop_box_graph(draws, height, width)
        images = fn.decoders.image_slice(jpegs, fn.cast(fn.stack(top, left), dtype=types.INT32),
                                         fn.cast(fn.stack(crop_h, crop_w), dtype=types.INT32), axis_names="HW",
                                         **decoder_args)
        images = fn.resize(images, resize_x=self.cfg.img_size, resize_y=self.cfg.img_size, interp_type=interp,
                           antialias=True)
        return fn.flip(images, horizontal=fn.cast(draws[DRAW_FLIP], dtype=types.INT32))

    def _val_graph(self, jpegs, decoder_args, interp):
        cfg = self.cfg
        short, crop = val_resize_size(cfg.img_size, cfg.crop_pct), cfg.img_size
        shape = fn.peek_image_shape(jpegs, dtype=types.INT64, adjust_orientation=False)
        height, width = shape[0], shape[1]
        portrait = width <= height  # torchvision: the width is the shorter side when width <= height
        new_h = portrait * ((short * height) // width) + (1 - portrait) * short
        new_w = portrait * short + (1 - portrait) * ((short * width) // height)
        images = fn.decoders.image(jpegs, **decoder_args)
        images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                           resize_y=fn.cast(new_h, dtype=types.FLOAT), interp_type=interp, antialias=True)
        anchor = fn.stack(_round_half_even_half(new_h - crop), _round_half_even_half(new_w - crop))
        return fn.slice(images, fn.cast(anchor, dtype=types.INT32), np.array([crop, crop], dtype=np.int32),
                        axes=[0, 1], normalized_anchor=False, normalized_shape=False)

    def _release(self) -> None:
        pipe, self._pipe = self._pipe, None
        del pipe  # DALI stops the pipeline's threads when the object goes away

    def close(self) -> None:
        self._release()
