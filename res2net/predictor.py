"""Classify image files: ``Predictor`` (load once, predict many) and ``predict`` (one call), what
scripts/predict.py runs.

    import res2net
    predictor = res2net.Predictor("outputs/<run>/checkpoints/best.pth")   # or "res2net50_26w_4s", "model.onnx"
    for p in predictor.predict(["cat.jpg", "photos/"], topk=3):
        print(p.path, p.names[0], p.probs[0])

The source brings its model, class names and evaluation preprocessing (res2net.data.preprocess, res2net.data.classes):
a train.py checkpoint, a variant name (its released ImageNet weights), a released .pth or .safetensors file (with
``model=``), an exported HF folder or an .onnx file from scripts/export.py (ONNX Runtime, CPU). Images are decoded
as the reference evaluation path does (PIL, res2net.data.loader_torchvision.decode_val_image), so the probabilities
equal those of ``evaluate.py save_predictions=true`` for the same files and checkpoint.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from res2net.data.classes import class_names_of
from res2net.data.index import IMG_EXTENSIONS
from res2net.data.preprocess import Preprocessing, preprocessing_of, published_preprocessing
from res2net.data.split import SPLIT_FILE, split_val_files

__all__ = ["Prediction", "Predictor", "expand_inputs", "predict"]


@dataclass(frozen=True)
class Prediction:
    path: str
    indices: tuple[int, ...]  # class indices, most probable first
    names: tuple[str, ...]
    probs: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"path": self.path, "indices": list(self.indices), "names": list(self.names), "probs": list(self.probs)}


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files, folders (their images, recursively, sorted), globs and a run's ``split.json`` (the val images train.py
    held out with data.val_split) as a list of image files, in the order given. FileNotFoundError naming an input
    that matches nothing."""
    files: list[str] = []
    for item in items:
        if os.path.basename(item) == SPLIT_FILE and os.path.isfile(item):
            found = split_val_files(item)
        elif os.path.isdir(item):
            found = sorted(
                os.path.join(d, f)
                for d, _, names in os.walk(item)
                for f in names
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"{item!r} is not an image file, a folder with images or a glob that matches one")
        files += found
    return files


def _load(source: str, model: str | None, use_ema: bool, trusted: bool) -> tuple[nn.Module, str, Mapping]:
    """(network in eval mode, model name, the source's record for preprocessing and class names)."""
    from res2net.engine.recipe import source_record
    from res2net.models.loading import build_model_for, fetch_checkpoint, read_checkpoint_dict

    path = Path(source).expanduser()
    if path.suffix == ".onnx":
        from res2net.export import OnnxRuntimeModel

        record = source_record(source, model)
        return OnnxRuntimeModel(path, threads=torch.get_num_threads()), record.get("model") or model or "", record
    record: Mapping | None = None
    if path.is_dir():  # an exported HF folder: config.json names the architecture
        record = source_record(source, model)
        model = model or record.get("architecture")
        path = path / "model.safetensors"
    else:  # a file, an http(s) URL or a variant name (its released weights: published preprocessing, no record)
        path = fetch_checkpoint(source, key="source")
        if not Path(source).expanduser().exists() and "://" not in source:
            model, record = model or source, {}
    checkpoint = read_checkpoint_dict(path, trusted=trusted)
    if record is not None and isinstance(record.get("res2net_model"), Mapping):  # the folder's model config
        checkpoint = {"model": checkpoint, "config": {"model": record["res2net_model"]}}
    record = checkpoint if record is None else record
    saved = checkpoint.get("config", {}).get("model", {}) if isinstance(checkpoint.get("config"), Mapping) else {}
    name = model or saved.get("name")
    if not name:
        raise ValueError(f"{path} does not name its model (not a train.py checkpoint); pass model=<variant>")
    net, cfg = build_model_for({"name": name, "num_classes": None}, checkpoint, use_ema, f"checkpoint {path}")
    return net, cfg["name"], record


class Predictor:
    """A model ready to classify image files with its own preprocessing and class names.

    Args:
        source: a train.py checkpoint, a variant name, a released .pth / .safetensors file, an exported HF folder
            or an .onnx file.
        device: 'cpu', 'cuda', 'cuda:1' ... (an .onnx file runs on the CPU).
        model: the variant of a file that does not name it (a released file, a bare state_dict).
        preprocessing: values that replace the source's (img_size, crop_pct, interpolation, mean, std; None keeps).
        use_ema: a train.py checkpoint's EMA weights. trusted: also read a file that needs the full unpickler.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        model: str | None = None,
        use_ema: bool = False,
        trusted: bool = False,
        **preprocessing,
    ) -> None:
        from res2net.engine.amp import resolve_channels_last
        from res2net.export import OnnxRuntimeModel
        from res2net.models.inference import prepare_for_inference

        self.device = torch.device(device)
        net, self.model_name, record = _load(os.fspath(source), model, use_ema, trusted)
        self.onnx = isinstance(net, OnnxRuntimeModel)
        if self.onnx and self.device.type != "cpu":
            raise ValueError(f"{source} runs with ONNX Runtime on the CPU; use device=cpu")
        base = preprocessing_of(record, self.model_name) if record else published_preprocessing(self.model_name)
        self.preprocessing: Preprocessing = base.overridden(**preprocessing)
        self.num_classes = int(net.num_classes)
        self.class_names = class_names_of(record, self.num_classes)
        # As evaluate.py prepares it (fold_bn=true, channels_last=auto), so the numbers agree with its predictions.
        self.channels_last = False if self.onnx else resolve_channels_last("auto", self.device, inference=True)
        self.net = net if self.onnx else prepare_for_inference(net.to(self.device).eval(), self.channels_last)
        self._scale, self._shift = _normalizer(self.preprocessing, self.device)

    def _images(self, paths: Sequence[str]) -> torch.Tensor:
        from res2net.data.loader_torchvision import decode_val_image

        pp = self.preprocessing
        batch = np.stack([decode_val_image(p, pp.img_size, pp.crop_pct, pp.interpolation) for p in paths])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        if not self.channels_last:
            x = x.contiguous()
        return x.float().mul_(self._scale).add_(self._shift)

    @torch.no_grad()
    def probabilities(self, paths: Sequence[str]) -> torch.Tensor:
        """(N, num_classes) softmax probabilities of the given image files, on the CPU."""
        logits = self.net(self._images(paths))
        return logits.float().log_softmax(dim=1).exp().cpu()

    def predict(self, inputs: Iterable[str] | str, topk: int = 5, batch_size: int = 32) -> Iterator[Prediction]:
        """The top-``topk`` classes of every image of ``inputs`` (files, folders, globs), in batches."""
        files = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
        k = min(topk, self.num_classes)
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            top = self.probabilities(chunk).topk(k, dim=1)
            for path, idx, prob in zip(chunk, top.indices.tolist(), top.values.tolist()):
                yield Prediction(path, tuple(idx), tuple(self.class_names[i] for i in idx), tuple(prob))


def _normalizer(pp: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std as x * scale + shift, computed as res2net.data.transforms.Normalizer does.
    std = torch.tensor(pp.std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
    shift = (-torch.tensor(pp.mean, dtype=torch.float32) / std).view(1, 3, 1, 1).to(device)
    return scale, shift


def predict(
    source: str | os.PathLike, inputs: Iterable[str] | str, topk: int = 5, device: str = "cpu", **kwargs
) -> list[Prediction]:
    """``Predictor(source, device, **kwargs).predict(inputs, topk)`` as a list."""
    return list(Predictor(source, device=device, **kwargs).predict(inputs, topk=topk))
