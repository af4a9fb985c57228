"""Deployment formats of a Res2Net classifier (ONNX, TorchScript, safetensors, a Hugging Face hub folder, an int8
ONNX file calibrated on real images) and ``OnnxRuntimeModel``, an ONNX Runtime session behind the model's own call,
``model(images) -> logits``.

onnx, onnxscript and onnxruntime (requirements-export.txt) are imported only by the functions that need them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from res2net.data.config import DataConfig
from res2net.data.preprocess import Preprocessing, preprocessing_of
from res2net.errors import CheckpointError
from res2net.files import atomic_write
from res2net.models.inference import prepare_for_inference

__all__ = [
    "CALIBRATION_IMAGES",
    "CALIBRATION_METHOD",
    "CALIBRATION_METHODS",
    "FORMATS",
    "GRAPH_OPTIMIZATIONS",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "OnnxRuntimeModel",
    "calibration_files",
    "checkpoint_eval_data",
    "eval_data_config",
    "compare_predictions",
    "export_hf",
    "export_onnx",
    "export_safetensors",
    "export_torchscript",
    "hf_config",
    "max_relative_error",
    "onnx_metadata",
    "quantize_int8",
    "quantize_static_int8",
    "timm_model_args",
]

FORMATS = ("onnx", "torchscript", "safetensors", "hf")
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_METHOD = "percentile"  # chosen by measurement: README, "Export and deployment", int8
CALIBRATION_IMAGES = 256
# Images per calibration run: ONNX Runtime's calibrators hold every intermediate tensor of the batches they are given
# at once, so they are fed one batch at a time to bound the memory.
_CALIBRATION_BATCH = 16


def _example(img_size: int, batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int = 224,
    opset: int = OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` (BatchNorm folded, eval mode) as an ONNX file with a dynamic batch axis, checked by
    onnx.checker. Input ``images`` (N, 3, img_size, img_size) float32, output ``logits`` (N, num_classes).
    ``metadata``: entries of the model's metadata_props (scripts/export.py records the preprocessing and the class
    names under 'res2net', res2net.engine.recipe.ONNX_METADATA_KEY)."""
    import onnx

    folded = prepare_for_inference(model.cpu(), channels_last=False)
    program = torch.onnx.export(
        folded,
        (_example(img_size),),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, img_size: int = 224) -> Path:
    """Write ``model`` (BatchNorm folded, eval mode) traced to TorchScript; load it with ``torch.jit.load``."""
    folded = prepare_for_inference(model.cpu(), channels_last=False)
    with torch.no_grad():
        traced = torch.jit.trace(folded, (_example(img_size),))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return path


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the weights (the state_dict as trained, BatchNorm not folded) as safetensors: no code, no pickle.
    ``res2net.load_pretrained`` and timm load the file into the same architecture."""
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    path = Path(path)
    with atomic_write(path) as f:
        f.write(save(state, metadata=dict(metadata) if metadata else None))
    return path


def timm_model_args(overrides: Mapping) -> dict:
    """timm's create_model arguments for our architecture overrides (a train.py checkpoint's model config), so timm
    builds a reduced or modified variant (e.g. the demo's) as it was trained."""
    args = {
        key: overrides[key]
        for key in ("layers", "base_width", "cardinality", "avg_down", "in_chans")
        if overrides.get(key) is not None
    }
    if overrides.get("layers") is not None:
        args["layers"] = list(overrides["layers"])
    if overrides.get("scale") is not None:
        args["block_args"] = {"scale": overrides["scale"]}
    if overrides.get("stem") is not None:
        args.update(stem_type="deep", stem_width=32) if overrides["stem"] == "deep" else args.update(stem_type="")
    return args


def hf_config(
    name: str,
    model: nn.Module,
    img_size: int = 224,
    model_args: Mapping | None = None,
    data: DataConfig | None = None,
    classes: Sequence[str] | None = None,
    model_config: Mapping | None = None,
) -> dict:
    """The config.json timm reads from a hub folder: architecture, num_classes, model_args (``timm_model_args``)
    and the pretrained_cfg (input size, interpolation, crop_pct, mean, std) of the validation transform
    (``DataConfig``'s defaults unless given; img_size is the input size); ``classes``: the class names, recorded as
    ``label_names`` (timm's key) when given; ``model_config``: our model config (name and knobs), recorded as
    ``res2net_model`` so scripts/predict.py and evaluate.py rebuild a reduced or modified variant as trained."""
    data = data or DataConfig()
    first_conv = "conv1.0" if isinstance(model.conv1, nn.Sequential) else "conv1"
    pretrained_cfg = dict(
        input_size=[3, img_size, img_size],
        fixed_input_size=False,
        interpolation=data.interpolation,
        crop_pct=data.crop_pct,
        crop_mode="center",
        mean=list(data.mean),
        std=list(data.std),
        num_classes=model.num_classes,
        pool_size=[img_size // 32] * 2,
        first_conv=first_conv,
        classifier="fc",
    )
    config = dict(
        architecture=name,
        num_classes=model.num_classes,
        num_features=model.num_features,
        global_pool="avg",
        pretrained_cfg=pretrained_cfg,
    )
    if model_args:
        config["model_args"] = dict(model_args)
    if classes is not None:
        pretrained_cfg["label_names"] = list(classes)
    if model_config:
        config["res2net_model"] = dict(model_config)
    return config


# Files that timm's local-dir: loader (and torch.load users) would unpickle: none may sit in an exported hub folder.
_PICKLED_WEIGHTS = ("*.pth", "*.pt", "*.bin", "*.ckpt", "*.pkl", "*.pth.tar")


def _refuse_pickled_weights(folder: Path) -> None:
    found = sorted({p.name for pattern in _PICKLED_WEIGHTS for p in folder.glob(pattern)}) if folder.is_dir() else []
    if found:
        raise ValueError(
            f"hub folder {folder} already holds {', '.join(found)}: an exported folder holds only config.json, "
            "model.safetensors and README.md (a pickled weights file there is loaded and unpickled ahead of "
            "model.safetensors by timm's local-dir:); remove it or export to an empty folder"
        )


def export_hf(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str,
    card: str,
    img_size: int = 224,
    model_args: Mapping | None = None,
    data: DataConfig | None = None,
    classes: Sequence[str] | None = None,
    model_config: Mapping | None = None,
) -> Path:
    """Write a Hugging Face hub folder: config.json (``hf_config``), model.safetensors and README.md (``card``); the
    weights only as safetensors, never a pickle.

    Load it by naming model.safetensors: timm's ``create_model(name, pretrained=True, num_classes=N,
    pretrained_cfg_overlay=dict(file=<folder>/model.safetensors, num_classes=N))`` (from the hub: the file
    ``hf_hub_download(<repo>, 'model.safetensors')`` returns), or ``res2net.load_pretrained``. Not timm's
    ``local-dir:<folder>``: it loads whichever ``*.pth`` / ``*.bin`` it finds in the folder ahead of
    model.safetensors, fully unpickled, so a file someone added there runs its code. For the same reason a folder
    that already holds such a file is refused (ValueError naming it).
    """
    folder = Path(folder)
    _refuse_pickled_weights(folder)
    folder.mkdir(parents=True, exist_ok=True)
    export_safetensors(model, folder / "model.safetensors", metadata={"format": "pt", "architecture": name})
    with atomic_write(folder / "config.json") as f:
        config = hf_config(name, model, img_size, model_args, data, classes, model_config)
        f.write((json.dumps(config, indent=2) + "\n").encode())
    with atomic_write(folder / "README.md") as f:
        f.write(card.encode())
    return folder


_WRITE_ONNX = "write one with scripts/export.py --format onnx"  # the hint of every unreadable-ONNX error


def _onnx_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found; {_WRITE_ONNX}")
    return path


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like the model it was exported from.

    ``forward(images)`` takes a float tensor (any memory format) and returns the logits as a CPU tensor, so the
    evaluation loop (``.eval()``, ``.train()``, ``num_classes``) runs it unchanged.

    Args:
        path: an ONNX file (``export_onnx``).
        threads: ORT intra-op threads (None: ORT's choice, one per physical core).
        optimization: ORT graph optimisation level, one of GRAPH_OPTIMIZATIONS ('all' adds the layout
            transformations for the CPU, e.g. NCHWc convolutions).
        spinning: let idle ORT threads spin (ORT's default); off for a machine shared with other busy processes.
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, optimization: str = "all", spinning: bool = True
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        if optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(f"optimization must be one of {GRAPH_OPTIMIZATIONS}, got {optimization!r}")
        path = _onnx_file(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own types (InvalidProtobuf, Fail, ...) with multi-line text
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path} is not an ONNX model ONNX Runtime can load ({reason}); {_WRITE_ONNX}"
            ) from err
        self.path = path
        self.input_name = self.session.get_inputs()[0].name
        # (C, H, W) of the graph's input; None entries are dynamic. Images of another size are refused by name.
        self.input_shape = tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape[1:])
        classes = self.session.get_outputs()[0].shape[-1]
        self.num_classes = classes if isinstance(classes, int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        got = tuple(images.shape[1:])
        if len(got) != len(self.input_shape) or any(e is not None and e != g for e, g in zip(self.input_shape, got)):
            want = "x".join("?" if e is None else str(e) for e in self.input_shape)
            raise ValueError(
                f"{self.path} takes {want} (C x H x W) images, got {'x'.join(map(str, got))}; evaluate at its size "
                f"(data.img_size={self.input_shape[-1]}, or no data.img_size: the file's own preprocessing) or export "
                "it again with scripts/export.py --img-size"
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def max_relative_error(
    candidate: Callable[[torch.Tensor], torch.Tensor],
    reference: nn.Module,
    batch_sizes: Sequence[int] = (1, 2),
    img_size: int = 224,
) -> float:
    """Largest ``max|candidate - reference| / max|reference|`` over random batches of each size (reference in eval
    mode, no grad): how far an exported model's outputs are from the PyTorch model's."""
    reference = reference.eval()
    worst = 0.0
    with torch.no_grad():
        for batch_size in batch_sizes:
            x = _example(img_size, batch_size)
            expected, got = reference(x), candidate(x)
            if got.shape != expected.shape:
                raise RuntimeError(f"exported model gives shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def eval_data_config(pp: Preprocessing) -> DataConfig:
    """A torchvision-backend DataConfig whose val loader applies the evaluation preprocessing ``pp``."""
    return DataConfig(backend="torchvision", num_workers=0, **pp.data_overrides())


def checkpoint_eval_data(checkpoint: Mapping, variant: str | None = None) -> DataConfig:
    """The evaluation preprocessing a checkpoint carries (``res2net.data.preprocess.preprocessing_of``: a train.py
    checkpoint's own, released weights' published one) as a torchvision-backend DataConfig, for calibration and
    checks."""
    return eval_data_config(preprocessing_of(checkpoint, variant))


def calibration_files(folder: str | os.PathLike, count: int) -> list[str]:
    """``count`` image files spread evenly over the sorted images under ``folder`` (searched recursively, hidden
    entries left out; all of them when it holds fewer): the same calibration set on every run, every class folder
    represented in proportion."""
    from res2net.data.index import IMG_EXTENSIONS

    if count < 1:
        raise ValueError(f"--calibration-images must be >= 1, got {count}")
    folder = Path(folder).expanduser()
    hint = "give a folder of training images, e.g. <data root>/train"
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} is not a directory; {hint}")
    files = sorted(
        str(path)
        for path in folder.rglob("*")
        if path.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
    if not files:
        raise FileNotFoundError(
            f"calibration folder {folder} holds no images (files ending in {', '.join(IMG_EXTENSIONS)}); {hint}"
        )
    if count >= len(files):
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def _preprocessed_batches(files: Sequence[str], data: DataConfig) -> list[np.ndarray]:
    """``files`` through ``data``'s evaluation transform (resize, center crop, normalize), as float32 NCHW
    batches of at most _CALIBRATION_BATCH images."""
    from res2net.data.loader_torchvision import decode_val_image
    from res2net.data.transforms import Normalizer

    normalize = Normalizer(data.mean, data.std, torch.device("cpu"), torch.float32, channels_last=False)
    batches = []
    for start in range(0, len(files), _CALIBRATION_BATCH):
        images = []
        for file in files[start : start + _CALIBRATION_BATCH]:
            try:
                images.append(decode_val_image(file, data.img_size, data.crop_pct, data.interpolation))
            except Exception as err:  # any decoder failure: PIL raises OSError, SyntaxError, ValueError, ...
                raise ValueError(
                    f"calibration image {file} cannot be decoded ({err!r}); remove it from the calibration folder"
                ) from err
        batches.append(normalize(torch.from_numpy(np.stack(images))).numpy())
    return batches


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared batches; ``set_range`` lets quantize_static feed
    the calibrator one batch at a time (its 'CalibStridedMinMax' option, which every calibration method honours)."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches = batches
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict | None:
        batch = next(self._pending, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    float_onnx: str | os.PathLike,
    out: str | os.PathLike,
    files: Sequence[str],
    data: DataConfig,
    method: str = CALIBRATION_METHOD,
    reduce_range: bool = False,
) -> Path:
    """Write ``out``: the float32 export ``float_onnx`` quantised to int8 (``quantize_static_int8``), its activation
    ranges calibrated with ``method`` on ``files`` put through ``data``'s evaluation preprocessing; returns ``out``.
    Its ONNX metadata records precision, quantisation, calibration method, image count and preprocessing."""
    calibration = {
        "calibration_images": str(len(files)),
        "calibration_preprocessing": json.dumps(
            dict(
                img_size=data.img_size,
                crop_pct=data.crop_pct,
                interpolation=data.interpolation,
                mean=list(data.mean),
                std=list(data.std),
            )
        ),
    }
    batches = _preprocessed_batches(files, data)
    return quantize_static_int8(float_onnx, out, batches, method, calibration, reduce_range=reduce_range)


def quantize_static_int8(
    float_onnx: str | os.PathLike,
    out: str | os.PathLike,
    batches: Sequence[np.ndarray],
    method: str = CALIBRATION_METHOD,
    metadata: Mapping[str, str] | None = None,
    reduce_range: bool = False,
) -> Path:
    """Write ``out``: ONNX Runtime's static int8 quantisation of the float32 export ``float_onnx`` (quant_pre_process,
    then QDQ with per-channel int8 weights and uint8 activations), activation ranges calibrated with ``method`` on
    ``batches`` (float32 NCHW model inputs); returns ``out``. ``reduce_range``: 7-bit weights (-64..63), ONNX
    Runtime's advice for x86 CPUs without VNNI, whose u8 x s8 dot product (VPMADDUBSW) saturates its 16-bit
    pair sums with full 8-bit weights. Its ONNX metadata: precision, quantisation, method and ``metadata``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    out = Path(out)
    # The calibrators print their progress to stdout: kept out of the caller's output.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp, redirect_stdout(io.StringIO()):
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(float_onnx), str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            _CalibrationReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,  # ONNX Runtime's x86 guidance: u8 activations, s8 weights
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            extra_options={"CalibStridedMinMax": 1},
        )
        proto = onnx.load(quantized)
    metadata = {
        "precision": "int8",
        "quantization": "onnxruntime static, QDQ, per-channel "
        + ("7-bit (reduce_range) int8" if reduce_range else "int8")
        + " weights, uint8 activations",
        "calibration_method": method,
        **(metadata or {}),
    }
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
    with atomic_write(out) as f:
        f.write(proto.SerializeToString())
    return out


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file: what scripts/export.py records there (the preprocessing and class names
    under res2net.engine.recipe.ONNX_METADATA_KEY; ``quantize_int8``'s precision and calibration). A missing file or
    one that is not an ONNX protobuf is one error naming it, as ``OnnxRuntimeModel`` gives."""
    import onnx
    from google.protobuf.message import DecodeError

    path = _onnx_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as err:
        raise CheckpointError(f"{path} is not an ONNX model ({err}); {_WRITE_ONNX}") from err
    return {p.key: p.value for p in model.metadata_props}


def compare_predictions(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> dict:
    """Top-1 / top-5 (percent) of both models over every (images, labels) batch, and their top-1 agreement (percent
    of images where both predict the same class): what an int8 file costs beside its float32 export."""
    hits = torch.zeros(2, 2, dtype=torch.long)  # [reference, candidate] x [top-1, top-5]
    agree = count = 0
    with torch.no_grad():
        for images, labels in batches:
            logits = [reference(images), candidate(images)]
            top = [x.topk(min(5, x.shape[1]), dim=1).indices for x in logits]
            for row, indices in enumerate(top):
                match = indices == labels[:, None]
                hits[row] += torch.stack([match[:, 0].sum(), match.any(dim=1).sum()])
            agree += int((top[0][:, 0] == top[1][:, 0]).sum())
            count += len(labels)
    if count == 0:
        raise ValueError("no images to compare the models on")
    percent = (100.0 * hits / count).tolist()
    return dict(
        count=count,
        reference_top1=percent[0][0],
        reference_top5=percent[0][1],
        candidate_top1=percent[1][0],
        candidate_top5=percent[1][1],
        agreement=100.0 * agree / count,
    )
