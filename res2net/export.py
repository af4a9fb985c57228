"""Deployment formats of a Res2Net classifier (ONNX, TorchScript, safetensors, a Hugging Face hub folder) and
``OnnxRuntimeModel``, an ONNX Runtime session behind the model's own call, ``model(images) -> logits``.

onnx, onnxscript and onnxruntime (requirements-export.txt) are imported only by the functions that need them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from res2net.data.config import DataConfig
from res2net.files import atomic_write
from res2net.models.inference import prepare_for_inference

__all__ = [
    "FORMATS",
    "GRAPH_OPTIMIZATIONS",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "OnnxRuntimeModel",
    "export_hf",
    "export_onnx",
    "export_safetensors",
    "export_torchscript",
    "hf_config",
    "max_relative_error",
    "timm_model_args",
]

FORMATS = ("onnx", "torchscript", "safetensors", "hf")
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")


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
    """Write a Hugging Face hub folder: config.json (``hf_config``), model.safetensors and README.md (``card``).

    timm loads it with ``create_model('local-dir:<folder>', pretrained=True)``, with ``create_model(name,
    pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=<folder>/model.safetensors, num_classes=N))``
    and, once uploaded, with ``create_model('hf-hub:<repo>', pretrained=True)``; ``res2net.load_pretrained`` loads
    its model.safetensors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    export_safetensors(model, folder / "model.safetensors", metadata={"format": "pt", "architecture": name})
    with atomic_write(folder / "config.json") as f:
        config = hf_config(name, model, img_size, model_args, data, classes, model_config)
        f.write((json.dumps(config, indent=2) + "\n").encode())
    with atomic_write(folder / "README.md") as f:
        f.write(card.encode())
    return folder


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
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} not found; write one with scripts/export.py --format onnx")
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
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self.input_name = self.session.get_inputs()[0].name
        # (C, H, W) of the graph's input; None entries are dynamic.
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
