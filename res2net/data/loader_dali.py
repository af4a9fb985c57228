"""NVIDIA DALI backend: the torchvision backend's order, sharding and crops, decoded by DALI.

Each rank's files of the epoch go to ``fn.readers.file`` unshuffled; crop boxes and flips come from an
external_source that calls the torchvision backend's functions, so a batch depends only on (seed, epoch, batch
index), for any thread count and after a resume. ``data.dali_resize``: 'graph' resizes and normalizes in DALI (the
GPU graph), 'torch' resizes the decoded crops with torch (the CPU default, see README "Speed"). Train pixel ops
(data.auto_augment / data.color_jitter) run in torch on both paths, with augment.py's code: the graph then ships the
resized, flipped crops as uint8 and torch augments and normalizes them where they are. An undecodable file stops the
epoch with an error naming it: DALI cannot skip a sample.
"""

import ctypes
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from PIL import Image

from .augment import TrainAugment
from .index import epoch_batches, train_positions
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

__all__ = ["DaliLoader", "resolve_decoder", "resolve_resize"]


def resolve_decoder(choice: str, device: torch.device) -> str:
    """'cpu' or 'mixed' for data.dali_decoder = auto | cpu | mixed and the loader's device."""
    if choice == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    if choice == "mixed":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "data.dali_decoder='mixed' decodes on a CUDA GPU, but CUDA is not available here; "
                "use data.dali_decoder=cpu (or auto)"
            )
        if device.type != "cuda":
            raise RuntimeError(
                f"data.dali_decoder='mixed' puts batches on the GPU, but the loader's device is "
                f"{device}; pass a CUDA device or use data.dali_decoder=cpu"
            )
    return choice


def resolve_resize(choice: str, decoder: str) -> str:
    """'graph' or 'torch' for data.dali_resize = auto | graph | torch and the resolved decoder ('cpu' | 'mixed'):
    auto = 'torch' with CPU decoding, 'graph' with 'mixed'; 'torch' needs CPU decoding."""
    if choice == "auto":
        return "torch" if decoder == "cpu" else "graph"
    if choice == "torch" and decoder != "cpu":
        raise ValueError(
            f"data.dali_resize={choice!r} is invalid with {decoder!r} decoding (data.dali_decoder="
            f"auto on a CUDA device, or mixed): expected one of ('auto', 'graph') there; 'torch' "
            "resizes CPU-decoded images, so use data.dali_decoder=cpu for it"
        )
    return str(choice)


def _round_half_even_half(d):
    """round(d / 2) with Python's round-half-to-even, for non-negative integer DALI nodes."""
    q = d // 2
    return q + (d - 2 * q) * (q - 2 * (q // 2))


# The 'mixed' decoder's buffers sized as NVIDIA's ResNet-50 DALI example does, for the largest ImageNet image (nvJPEG's
# device and pinned host buffers, the hardware decoder's preallocation), so that it never reallocates mid-training;
# hw_decoder_load is the share of each batch sent to the A100 / H100 hardware JPEG decoder (DALI's default).
MIXED_DECODER_ARGS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    hw_decoder_load=0.65,
)
_LIBC = ctypes.CDLL(None)  # this process's C library (DALI runs on Linux only)
HEADER_THREADS = 8  # threads reading a train batch's JPEG headers (I/O-bound: a cold disk or a network file system)

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, the size libjpeg-turbo and PIL decode to; None when
    the file is not a JPEG or its header is unusual (the caller then asks PIL). Reads only the header, faster than
    PIL's Image.open, which matters because the train loader reads one per sample in its main thread."""
    with open(path, "rb") as f:
        buf = f.read(4096)
        if buf[:2] != b"\xff\xd8":
            return None
        pos = 2
        while True:
            if pos + 9 > len(buf):  # the next segment header lies beyond what was read (large APPn segments)
                more = f.read(max(4096, pos + 9 - len(buf)))
                if not more:
                    return None
                buf += more
                continue
            if buf[pos] != 0xFF:
                return None
            marker = buf[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
            elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                pos += 2
            elif marker in _SOF_MARKERS:
                height, width = struct.unpack_from(">HH", buf, pos + 5)
                return (height, width) if height and width else None  # height 0: defined later (DNL)
            elif marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                return None
            else:
                pos += 2 + struct.unpack_from(">H", buf, pos + 2)[0]


def _over_pixel_limit(path: str, height: int, width: int) -> str | None:
    """Why DALI must not decode an image of this size (it has no decompression-bomb guard of its own: a small file
    can declare 400 megapixels and exhaust memory), or None. The limit is PIL's, so both backends refuse the same
    files: PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (None turns both off)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or height * width <= 2 * limit:
        return None
    return (
        f"{path} declares {width}x{height} pixels ({height * width / 1e6:.0f} megapixels), more than the "
        f"{2 * limit / 1e6:.0f}-megapixel limit against decompression bombs (PIL.Image.MAX_IMAGE_PIXELS); "
        "shrink or remove it"
    )


def _header_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header: jpeg_size, else PIL (which raises DecompressionBombError itself)."""
    size = jpeg_size(path)
    if size is None:  # PNG named .JPEG and other rarities
        with Image.open(path) as img:
            size = img.height, img.width
    return size


def _return_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim, well under a millisecond; a no-op
    elsewhere), after every pass. A train pipeline is built per epoch (its file order changes) and DALI's threads
    leave their freed buffers in glibc's per-thread arenas: without this the process grew ~0.3 MiB per epoch in
    CPU mode (README "Speed")."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class _HeaderError(Exception):
    """A train file whose size PIL cannot read from its header (so no crop box can be drawn for it)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# A DALI error from one of these operators is about the files (reading or decoding them), not about our code.
_READ_OPS = re.compile(r"fn\.(decoders|readers)\.")


def _suspects(files: Sequence[str]) -> list[str]:
    """The files of a failed batch that PIL cannot decode either."""
    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception:  # any decoder failure marks the file
            bad.append(path)
    return bad


class DaliLoader(EpochLoader):
    """The Loader protocol (loader_base.EpochLoader) over a DALI pipeline rebuilt per epoch."""

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
        self.cfg, self.train, self.batch_size = cfg, train, cfg.batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.normalize = normalizer  # its dtype and layout are the output contract; the graph normalizes
        self.decoder = resolve_decoder(cfg.dali_decoder, device)
        # 'torch': the graph ends at the decoded images (train: crops) and torch resizes them (PIL's filters, and
        # faster than DALI's CPU resize); 'graph': the graph resizes and normalizes, with the same operators
        # wherever it runs ('mixed' decoding always; CPU decoding when asked, which is how the GPU graph is tested
        # on a machine without one).
        self.resize = resolve_resize(cfg.dali_resize, self.decoder)
        self._torch_resize = self.resize == "torch"
        # CPU decoding for a CPU consumer normalizes each image after its resize; for a GPU consumer it ships uint8
        # and normalizes on the GPU (a quarter of float32's host-to-device traffic).
        self._normalize_each = device.type == "cpu"
        self._paths = np.array([p for p, _ in samples])
        self._labels = np.array([label for _, label in samples], dtype=np.int32)
        # (height, width) of each sample as PIL reads it from the file header, filled on first use (-1: not yet).
        self._shapes = np.full((len(samples), 2), -1, dtype=np.int32) if train else None
        self._batches = epoch_batches(len(samples), self.batch_size, rank, world_size, train=train)
        if not train:
            shard = slice(self._batches.start, self._batches.stop)
            self.paths = [str(p) for p in self._paths[shard]]
            self.targets = [int(t) for t in self._labels[shard]]
        self.augment, self.val_size = TrainAugment(cfg, seed), eval_img_size(cfg.img_size, cfg.val_img_size)
        # 'graph' with train pixel ops: the graph ends at the resized, flipped uint8 crops (NHWC), which
        # augment.apply_batch augments in torch where they are (the GPU with 'mixed' decoding) and the Normalizer
        # normalizes: the same ops and magnitudes as the other paths and backends.
        self._graph_uint8 = train and self.augment.pixel_ops and not self._torch_resize
        self.epoch, self._start = 0, 0
        self.skipped = 0  # DALI never skips: an undecodable file raises (see the module docstring)
        self._sizes_checked = False  # val: every file's header checked against the pixel limit (once)
        self._pipe = None
        # The val pipeline is built once and reused across epochs (its files never change): the batch it yields
        # next and the batch its reader's cycle starts at (set_epoch's start_batch); another start rebuilds it.
        self._pipe_start = self._pipe_next = 0
        self._header_pool = None  # ThreadPoolExecutor for _shapes, made on first use

    def _seek(self, epoch: int, start_batch: int) -> None:
        self.epoch, self._start = epoch, start_batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Sample indices this rank reads in ``epoch``, in order (whole batches only for train)."""
        return self.epoch_positions(epoch)[0]

    def epoch_positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch_indices, their positions in the epoch: the key of their draws, see index.train_positions)."""
        if self.train:
            n, repeats = len(self._paths), self.cfg.repeated_aug
            order, positions = train_positions(n, self.rank, self.world_size, self.seed, epoch, repeats)
            return order[: self.num_samples], positions[: self.num_samples]
        order = np.arange(self._batches.start, self._batches.stop)
        return order, order

    def __iter__(self):
        start, self._start = self._start, 0  # a later iteration without set_epoch repeats the epoch from batch 0
        batches = self._batches.remaining(start)
        if not batches:
            return
        first = self._batches.bounds(start)[0]
        indices, positions = (a[first:] for a in self.epoch_positions(self.epoch))
        files = [str(p) for p in self._paths[indices]]
        if not self.train and not self._sizes_checked:  # train checks each size as it draws a crop box (_shape)
            self._refuse_too_large(self.paths)
            self._sizes_checked = True
        pipe = self._pipeline(files, indices, positions, start)
        try:
            for b in batches:
                lo, hi = self._batches.bounds(b)
                outputs = self._run(pipe, b, files[lo - first : hi - first])
                self._pipe_next = b + 1 if b + 1 < len(self) else self._pipe_start
                batch_positions = positions[lo - first : hi - first]
                images, labels = self._to_torch(*outputs, positions=batch_positions)
                if self.train:
                    images = self.augment.erase(images, self.epoch, batch_positions)
                # The reader pads the last val batch by repeating its last file; trimmed, so every image counts once.
                yield images[: hi - lo], labels[: hi - lo].to(self.device, non_blocking=True)
        finally:
            # A train pipeline is closed at the epoch's end or as soon as its iterator is dropped (a stop at
            # max_steps or by a signal leaves it suspended): its threads and decoder buffers go at once.
            if self.train and self._pipe is pipe:
                self._release()
            _return_freed_heap()

    def _pipeline(self, files: list[str], indices: np.ndarray, positions: np.ndarray, start: int) -> Pipeline:
        """The pipeline that yields batch ``start`` next: train builds one per epoch; val reuses its pipeline when
        that stands at the start of its cycle (a whole pass leaves it there: the reader pads the last batch, so
        its next pass starts again at the first file), else rebuilds it."""
        if self.train or self._pipe is None or (self._pipe_start, self._pipe_next) != (start, start):
            self._release()
            self._pipe = self._build_pipeline(files, self._labels[indices].tolist(), indices, positions)
            self._pipe_start = self._pipe_next = start
        return self._pipe

    def _run(self, pipe: Pipeline, b: int, batch_files: list[str]):
        """Batch ``b``'s outputs; 'mixed' returns them on torch's current stream (no host synchronisation: DALI's
        default execution model, exec_dynamic, supports it), CPU decoding host-ready. Errors name the files."""
        try:
            if self.decoder == "mixed":
                return pipe.run(torch.cuda.current_stream(self.device))
            return pipe.run()
        except _HeaderError as err:
            self._release()
            raise DataReadError(
                f"DALI train loader cannot use {err.path} (epoch {self.epoch}, rank "
                f"{self.rank}): {err.reason}. Find such files with `python scripts/check_dataset.py "
                f"{self.cfg.root}` (--fix re-encodes them), or use data.backend=torchvision, which skips them."
            ) from err
        except RuntimeError as err:
            self._release()
            bad = _suspects(batch_files)
            if not bad and not _READ_OPS.search(str(err)):
                raise  # not a file DALI could not read or decode (e.g. a bug in a Python callback): as it is
            raise DataReadError(
                f"DALI failed on batch {b} of epoch {self.epoch} (rank {self.rank}); undecodable "
                f"file(s): {bad or batch_files}\n{err}\nFind such files with "
                f"`python scripts/check_dataset.py {self.cfg.root}` (--fix re-encodes them), or use "
                "data.backend=torchvision, which skips them."
            ) from err

    def _refuse_too_large(self, files: list[str]) -> None:
        """RuntimeError naming the first val file over the pixel limit, before DALI decodes any (headers only)."""
        for path in files:
            try:
                height, width = _header_size(path)
            except Image.DecompressionBombError as err:
                raise RuntimeError(f"DALI val loader cannot use {path}: {err}") from None
            except Exception:  # an unreadable header: DALI's decoder fails on it and the batch error names it
                continue
            too_large = _over_pixel_limit(path, height, width)
            if too_large:
                raise RuntimeError(f"DALI val loader cannot use {path}: {too_large}")

    def _graph_dtype(self):
        """The graph's output type: float16 when asked for, else float32 (DALI has no bfloat16). DALI's CPU
        crop_mirror_normalize writes float16 too, so the CPU and GPU graphs are the same here."""
        if self.normalize.dtype == torch.float16:
            return types.FLOAT16, torch.float16
        return types.FLOAT, torch.float32

    def _to_torch(self, images, labels, flips=None, *, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input batch (NCHW, channels_last strides when asked, ``dtype``, on the device). 'torch':
        ``images`` are the decoded images (train: crops, with their ``flips``), resized here. 'graph': the graph's
        normalized NCHW / NHWC batch, copied into a torch tensor where the graph ran ('mixed': on the GPU, on
        torch's stream; CPU decoding: in host memory, then moved to the device if that is CUDA); with train pixel
        ops its uint8 NHWC crops, augmented there (_augment) and then normalized."""
        labels = self._pinned(torch.from_numpy(labels.as_array().reshape(-1).astype(np.int64)))
        if self._torch_resize:
            flips = None if flips is None else flips.as_array().reshape(-1)
            return self._resize_crops(images, flips, positions), labels
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = images.as_tensor()
        on_gpu = self.decoder == "mixed"
        out = torch.empty(
            tensor.shape(),
            dtype=torch.uint8 if self._graph_uint8 else self._graph_dtype()[1],
            device=self.device if on_gpu else "cpu",
            pin_memory=not on_gpu and self.device.type == "cuda",
        )
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        if self._graph_uint8:
            return self.normalize(self._augment(out, positions)), labels
        if self.normalize.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: exactly the channels_last layout
        return out.to(self.device, self.normalize.dtype, non_blocking=True), labels  # keeps the strides

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in pinned host memory when the consumer is a GPU, so its copy there does not block the host."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _augment(self, images: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """A train batch of uint8 NHWC crops (resized and flipped) with its auto_augment / colour jitter plan
        applied in place (augment.TrainAugment.apply_batch, the torchvision backend's ops), on either path."""
        return self.augment.apply_batch(images, self.augment.plan(self.epoch, positions[: len(images)]))

    def _resize_crops(self, crops, flips: np.ndarray | None, positions: np.ndarray) -> torch.Tensor:
        """The model's input batch from the decoded crops: each resized to img_size x img_size with torch's
        antialiased uint8 resampling (PIL's filters), flipped where ``flips`` says and normalized one image at a
        time while it is in cache (the same float32 operations as transforms.Normalizer, so the same values; faster
        than normalizing the batch afterwards). For a CUDA
        device the uint8 batch goes to transforms.Normalizer instead, which normalizes on the GPU. With train pixel
        ops (auto_augment / colour jitter) the flipped crops stay uint8, _augment applies their plan (as on the
        'graph' path) and the Normalizer normalizes (the same values as normalizing each image)."""
        size = self.augment.img_size(self.epoch) if flips is not None else self.val_size
        mode = self.cfg.interpolation  # 'bilinear' | 'bicubic': torch's names too
        augment = flips is not None and self.augment.pixel_ops
        short = val_resize_size(size, self.cfg.crop_pct)
        norm = self.normalize
        normalize_each = self._normalize_each and not augment
        if normalize_each:
            fmt = torch.channels_last if norm.channels_last else torch.contiguous_format
            out = torch.empty((len(crops), 3, size, size), dtype=torch.float32, memory_format=fmt)
            scale, shift = norm.scale[0], norm.shift[0]
        else:
            out = torch.empty((len(crops), size, size, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        for i in range(len(crops)):
            crop = torch.from_dlpack(crops[i]).permute(2, 0, 1)[None]  # HWC memory: channels_last, uint8 fast path
            if flips is None:  # val: shorter side to `short` as torchvision computes it, then the center crop
                new_h, new_w = val_resized_shape(crop.shape[2], crop.shape[3], short)
                image = torch.nn.functional.interpolate(
                    crop, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False
                )[0]
                top, left = center_crop_offset(new_h, size), center_crop_offset(new_w, size)
                image = image[:, top : top + size, left : left + size]
            else:
                image = torch.nn.functional.interpolate(
                    crop, size=(size, size), mode=mode, antialias=True, align_corners=False
                )[0]
            if flips is not None and flips[i]:
                image = image.flip(-1)
            if normalize_each:
                out[i].copy_(image).mul_(scale).add_(shift)
            else:
                out[i].copy_(image.permute(1, 2, 0))
        if augment:
            out = self._augment(out, positions)
        return out.to(norm.dtype) if normalize_each else norm(out)

    def _shape(self, idx: int) -> tuple[int, int]:
        """(height, width) of sample ``idx`` from its header (as PIL, hence the torchvision backend, sees it),
        cached."""
        h, w = self._shapes[idx]
        if h < 0:
            path = str(self._paths[idx])
            try:
                h, w = _header_size(path)
            except Exception as err:  # any reader failure: not an image PIL knows, truncated header, unreadable
                raise _HeaderError(path, repr(err)) from err
            too_large = _over_pixel_limit(path, h, w)
            if too_large:
                raise _HeaderError(path, too_large)
            self._shapes[idx] = h, w
        return int(h), int(w)

    def _batch_shapes(self, idxs: np.ndarray) -> list[tuple[int, int]]:
        """``_shape`` of each sample; the headers not read yet (epoch 0) are read by a thread pool, in parallel."""
        missing = idxs[self._shapes[idxs, 0] < 0]
        if len(missing) > 1:
            if self._header_pool is None:
                self._header_pool = ThreadPoolExecutor(HEADER_THREADS, thread_name_prefix="dali-jpeg-header")
            list(self._header_pool.map(self._shape, missing))  # raises the first _HeaderError
        return [self._shape(i) for i in idxs]

    def _boxes_source(self, indices: np.ndarray, positions: np.ndarray):
        """external_source callback: for pipeline iteration i, the RandomResizedCrop box (anchor (top, left),
        shape (h, w)) and flip of each sample, computed by transforms.random_resized_crop_box -- the torchvision
        backend's own function -- from the draws of the epoch positions of the samples read and the file's size.
        The reader wraps around after the last file when the pipeline prefetches past the end; those batches are
        never yielded, but their boxes must still fit the files read, hence the modulo."""
        seed, epoch, cfg, n = self.seed, self.epoch, self.cfg, len(indices)

        def boxes(info):
            base = info.iteration * self.batch_size
            draws = augmentation_draws(
                seed,
                epoch,
                positions[np.arange(base, base + self.batch_size) % n],
                cfg.train_crop_scale,
                cfg.train_crop_ratio,
                cfg.hflip,
            )
            out = np.empty((self.batch_size, 5), dtype=np.int32)
            sizes = self._batch_shapes(indices[(base + np.arange(self.batch_size)) % n])
            for j, (height, width) in enumerate(sizes):
                out[j, :4] = random_resized_crop_box(draws[j], height, width)
                out[j, 4] = draws[j, DRAW_FLIP]
            return list(out[:, 0:2]), list(out[:, 2:4]), [np.array(v) for v in out[:, 4]]

        return boxes

    def _build_pipeline(
        self, files: list[str], labels: list[int], indices: np.ndarray, positions: np.ndarray
    ) -> Pipeline:
        cfg = self.cfg
        interp = types.INTERP_LINEAR if cfg.interpolation == "bilinear" else types.INTERP_CUBIC
        device_id = None
        if self.decoder == "mixed":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, cfg.num_workers),
            device_id=device_id,
            prefetch_queue_depth=cfg.prefetch,
        )
        # EXIF orientation is ignored, as PIL does.
        decoder_args = dict(device=self.decoder, output_type=types.RGB, adjust_orientation=False)
        if self.decoder == "mixed":
            decoder_args["jpeg_fancy_upsampling"] = True  # nvJPEG upsamples chroma as libjpeg-turbo does on the CPU
            decoder_args.update(MIXED_DECODER_ARGS)
        with pipe:
            jpegs, label_node = fn.readers.file(
                files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="reader"
            )
            if self.train:
                anchor, shape, flip = fn.external_source(
                    source=self._boxes_source(indices, positions),
                    num_outputs=3,
                    batch=True,
                    batch_info=True,
                    dtype=types.INT32,
                )
                if self._torch_resize:
                    crops = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", **decoder_args)
                    pipe.set_outputs(crops, label_node, flip)
                else:
                    images = self._train_graph(jpegs, decoder_args, interp, anchor, shape)
                    if self._graph_uint8:  # torch augments and normalizes (see _to_torch)
                        pipe.set_outputs(fn.flip(images, horizontal=flip), label_node)
                    else:
                        pipe.set_outputs(self._normalize_graph(images, flip), label_node)
            elif self._torch_resize:
                pipe.set_outputs(fn.decoders.image(jpegs, **decoder_args), label_node)
            else:
                pipe.set_outputs(self._normalize_graph(self._val_graph(jpegs, decoder_args, interp), 0), label_node)
        pipe.build()
        return pipe

    def _train_graph(self, jpegs, decoder_args, interp, anchor, shape):
        """RandomResizedCrop from the per-sample box (see _boxes_source), decoded as a region of interest and
        resized in the graph (the 'graph' path; 'torch' resizes in _resize_crops); the flip is done by
        _normalize_graph, or by fn.flip when torch augments the uint8 crops."""
        images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", **decoder_args)
        size = self.augment.img_size(self.epoch)
        return fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)

    def _normalize_graph(self, images, mirror):
        """Flip, normalize with mean / std, lay out as CHW (HWC for channels_last) and convert, in one operator
        (crop_mirror_normalize; the 'graph' path): the consumer only copies the output (see _to_torch)."""
        cfg = self.cfg
        return fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            mean=[255.0 * m for m in cfg.mean],
            std=[255.0 * s for s in cfg.std],
            dtype=self._graph_dtype()[0],
            output_layout="HWC" if self.normalize.channels_last else "CHW",
        )

    def _val_graph(self, jpegs, decoder_args, interp):
        """torchvision's Resize(shorter side) + CenterCrop in the graph ('graph' path), from the encoded image's
        shape with integer arithmetic that reproduces torchvision exactly: DALI's own resize_shorter would round the
        long side where torchvision truncates, and its center crop would round the offset differently."""
        cfg = self.cfg
        short, crop = val_resize_size(self.val_size, cfg.crop_pct), self.val_size
        shape = fn.peek_image_shape(jpegs, dtype=types.INT64, adjust_orientation=False)
        height, width = shape[0], shape[1]
        portrait = width <= height  # torchvision: the width is the shorter side when width <= height
        new_h = portrait * ((short * height) // width) + (1 - portrait) * short
        new_w = portrait * short + (1 - portrait) * ((short * width) // height)
        top, left = _round_half_even_half(new_h - crop), _round_half_even_half(new_w - crop)
        # Resize only the input region that becomes the center crop: the same sampling positions and filter as
        # resizing the whole image to (new_h, new_w) and then cropping (outputs differ by at most one grey level in
        # a few pixels), for less resize work.
        scale_y = fn.cast(height, dtype=types.FLOAT64) / fn.cast(new_h, dtype=types.FLOAT64)
        scale_x = fn.cast(width, dtype=types.FLOAT64) / fn.cast(new_w, dtype=types.FLOAT64)
        roi_start = fn.cast(fn.stack(top * scale_y, left * scale_x), dtype=types.FLOAT)
        roi_end = fn.cast(fn.stack((top + crop) * scale_y, (left + crop) * scale_x), dtype=types.FLOAT)
        images = fn.decoders.image(jpegs, **decoder_args)
        return fn.resize(
            images,
            size=[crop, crop],
            roi_start=roi_start,
            roi_end=roi_end,
            roi_relative=False,
            interp_type=interp,
            antialias=True,
        )

    def _release(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # DALI's own teardown (what Pipeline.__del__ runs; there is no public close): stops its threads and
            # frees its buffers now. Dropping the reference alone left them to the garbage collector, which breaks
            # the pipeline's reference cycles only at some later collection.
            pipe._shutdown()

    def close(self) -> None:
        self._release()
        if self._header_pool is not None:
            self._header_pool.shutdown(wait=False, cancel_futures=True)
            self._header_pool = None
