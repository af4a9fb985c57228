"""Evaluate one checkpoint on a validation set: the library side of evaluate.py, scripts/eval_released.py and
scripts/eval_suite.py.

Takes plain values or an OmegaConf node (never Hydra's global state): resolve the checkpoint (a released model's file,
downloaded and verified into the cache when missing, or a local file), build the model it was made for, prepare it
for inference, run the count-exact loop (``loops.evaluate``) over this rank's shard, and on rank 0 write
results.json (and predictions.csv when asked). The set is ImageNet val (``<data.root>/val/``, optionally scored
against ReaL labels) or an evaluation set (``testset``: ImageNetV2, -Sketch, -R, -A; res2net.data.testsets),
labelled in ImageNet-1k's classes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from res2net.config import EvalConfig, as_eval_config, to_dict
from res2net.data.classes import class_names_of
from res2net.engine.amp import resolve_amp, resolve_channels_last
from res2net.engine.distributed import DistInfo, select_device
from res2net.engine.eval_loop import PREDICTION_TOPK, evaluate
from res2net.engine.eval_metrics import read_real_labels, real_label_rows
from res2net.engine.metrics import dataset_name
from res2net.models.loading import load_checkpoint_model
from res2net.models.stats import count_params

__all__ = [
    "Published",
    "published_for",
    "evaluate_checkpoint",
    "summary_lines",
    "write_predictions_csv",
    "RESULTS_FILE",
    "PREDICTIONS_FILE",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.csv"
_RESULT_KEYS = ("top1", "top5", "loss", "nll", "ece", "count", "param_count", "img_per_s", "seconds")
_REAL_KEYS = ("real_top1", "real_top5", "real_count")


@dataclass(frozen=True)
class Published:
    top1: float
    top5: float | None


def published_for(checkpoint: str | Path, model_name: str) -> Published | None:
    """Published top-1/top-5 when the checkpoint is a released file (by spec 'released' or by file name)."""
    from res2net.models.variants import RELEASED

    entry = (
        RELEASED.get(model_name)
        if str(checkpoint) == "released"
        else next((e for e in RELEASED.values() if e.file == Path(checkpoint).name), None)
    )
    if entry is None or entry.top1 is None:
        return None
    return Published(entry.top1, entry.top5)


def _resolve_device(spec: str, dist_info: DistInfo) -> torch.device:
    if spec == "auto":
        return dist_info.device
    return select_device(spec, dist_info.local_rank, dist_info.world_size)


def _prepare(model: nn.Module, cfg: EvalConfig, channels_last: bool, device: torch.device) -> nn.Module:
    import res2net

    model = model.to(device).eval()
    if cfg.fold_bn:
        return res2net.prepare_for_inference(model, channels_last=channels_last, compile=cfg.compile)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def write_predictions_csv(path: Path, predictions: list[dict], class_names: list[str] | None = None) -> None:
    """path, target, top1..5 (class indices), prob1..5; with ``class_names`` (index -> name) also target_name and
    name1..5 at the end."""
    ks = range(1, PREDICTION_TOPK + 1)
    names = [] if class_names is None else ["target_name", *[f"name{k}" for k in ks]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "target", *[f"top{k}" for k in ks], *[f"prob{k}" for k in ks], *names])
        for p in predictions:
            pad = [""] * (PREDICTION_TOPK - len(p["top5"]))  # fewer classes than PREDICTION_TOPK
            row = [p["path"], p["target"], *p["top5"], *pad, *[f"{v:.6f}" for v in p["top5_prob"]], *pad]
            if class_names is not None:
                row += [class_names[p["target"]], *[class_names[i] for i in p["top5"]], *pad]
            writer.writerow(row)


def _results(
    result: dict,
    classes: list[str],
    record: dict,
    ckpt_path: Path,
    published: Published | None,
    dist_info: DistInfo,
    device: torch.device,
) -> dict:
    from res2net.models.download import sha256_file

    per_class = {
        c: (100.0 * k / n if n else None)
        for c, k, n in zip(classes, result["per_class_correct"], result["per_class_count"])
    }
    out = {key: result[key] for key in _RESULT_KEYS + tuple(k for k in _REAL_KEYS if k in result)}
    out.update(
        dataset=dataset_name(record["data"], record["testset"]),
        model=record["model"]["name"],
        checkpoint=str(ckpt_path),
        checkpoint_sha256=sha256_file(ckpt_path),
        per_class_accuracy=per_class,
        per_class_count=dict(zip(classes, result["per_class_count"])),
        world_size=dist_info.world_size,
        device=str(device),
        published=None,
        config=record,
    )
    if published is not None:
        out["published"] = {
            "top1": published.top1,
            "top5": published.top5,
            "delta_top1": result["top1"] - published.top1,
            "delta_top5": None if published.top5 is None else result["top5"] - published.top5,
        }
    return out


def _check_options(cfg: EvalConfig) -> None:
    """Refuse option combinations that cannot be evaluated, before any data is read; the error names the key."""
    if cfg.testset:
        if cfg.real_labels:
            raise ValueError(
                f"real_labels applies to ImageNet val, not to testset={cfg.testset}; drop real_labels or use "
                f"data=imagenet"
            )
    elif cfg.testset_variant:
        raise ValueError(
            f"testset_variant={cfg.testset_variant!r} needs an evaluation set with variants (data=imagenet_v2)"
        )


def _build_loader(
    cfg: EvalConfig, dist_info: DistInfo, device: torch.device, channels_last: bool
) -> tuple[Any, list[int] | None]:
    """(this rank's val loader, the class indices scored: None for all)."""
    from res2net.data import build_loader
    from res2net.data.testsets import eval_set_loader, scan_eval_set, scored_classes

    common = dict(rank=dist_info.rank, world_size=dist_info.world_size, device=device, channels_last=channels_last)
    if not cfg.testset:
        return build_loader(cfg.data, "val", **common), None
    samples = scan_eval_set(cfg.data.root, cfg.testset, cfg.testset_variant)
    return eval_set_loader(cfg.data, samples, **common), scored_classes(cfg.testset, samples)


def _check_imagenet1k_classes(model_cfg: Mapping, checkpoint: Mapping, what: str) -> None:
    """Evaluation sets and ReaL are labelled in ImageNet-1k's sorted wnids: the model must predict exactly those (the
    released checkpoints do; a train.py checkpoint did when it was trained on ImageNet-1k)."""
    from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS

    if model_cfg["num_classes"] != len(IMAGENET1K_WNIDS):
        raise ValueError(
            f"{what} is labelled in ImageNet-1k's {len(IMAGENET1K_WNIDS)} classes but the model "
            f"predicts {model_cfg['num_classes']}; evaluate a checkpoint trained on ImageNet-1k"
        )
    saved = checkpoint.get("config")
    root = saved.get("data", {}).get("root") if isinstance(saved, Mapping) else None
    train_dir = Path(root) / "train" if root else None
    if train_dir is not None and train_dir.is_dir():
        trained = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if trained != list(IMAGENET1K_WNIDS):
            odd = sorted(set(trained) ^ set(IMAGENET1K_WNIDS))[:3]
            raise ValueError(
                f"{what} is labelled in ImageNet-1k's sorted wnids, but the checkpoint was trained on "
                f"{train_dir}, whose {len(trained)} class folders are not those (e.g. {odd}); its "
                f"class indices would mean other classes"
            )


def _onnxruntime_model(cfg: EvalConfig, amp: str, device: torch.device) -> tuple[nn.Module, Path, dict, dict]:
    """(ONNX Runtime runner, its file, the model config, an empty checkpoint) for runtime=onnxruntime: the
    checkpoint is an .onnx file from scripts/export.py, run on the CPU in fp32."""
    from res2net.export import OnnxRuntimeModel
    from res2net.models import resolve_model_config

    if device.type != "cpu" or amp != "off" or cfg.tta != "none":
        raise ValueError(
            f"runtime=onnxruntime evaluates the exported fp32 graph on the CPU as it is: set device=cpu amp=off "
            f"tta=none (got device={device.type} amp={amp} tta={cfg.tta})"
        )
    path = Path(cfg.checkpoint).expanduser()
    if path.suffix != ".onnx":
        raise ValueError(
            f"runtime=onnxruntime needs checkpoint=<file>.onnx (scripts/export.py --format onnx), got {path}"
        )
    net = OnnxRuntimeModel(path, threads=torch.get_num_threads())
    return net, path, {**resolve_model_config(_model_dict(cfg)), "num_classes": net.num_classes}, {}


def _model_dict(cfg: EvalConfig) -> dict:
    return dataclasses.asdict(cfg.model)


def evaluate_checkpoint(
    cfg: Any, out_dir: str | Path | None, dist_info: DistInfo | None = None, keep_data: Iterable[str] | None = None
) -> dict | None:
    """Evaluate per `cfg` (an EvalConfig, its composed node or a mapping whose missing keys take EvalConfig's
    defaults: model, data, checkpoint, use_ema, amp, channels_last, compile, fold_bn, device, save_predictions,
    progress, trust_checkpoint, real_labels, tta, testset, testset_variant). On rank 0 returns the results dict (also
    written to out_dir/results.json, and out_dir/predictions.csv with save_predictions); None on the other ranks.

    ``keep_data``: None evaluates with ``cfg.data`` as given; a collection (evaluate.py passes the data fields set
    on its command line, ``res2net.data.preprocess.command_line_fields``) takes the checkpoint's own evaluation
    preprocessing (and val split) for every other field (res2net.engine.recipe)."""
    from res2net.engine.recipe import apply_recipe, source_record

    dist_info = dist_info or DistInfo()
    cfg = as_eval_config(cfg)
    _check_options(cfg)
    source = source_record(cfg.checkpoint, cfg.model.name, cfg.trust_checkpoint)  # its preprocessing, class names
    if keep_data is not None:
        data = apply_recipe(dataclasses.asdict(cfg.data), source, cfg.model.name, keep_data)[0]
        cfg.data = type(cfg.data)(**data)
    device = _resolve_device(cfg.device, dist_info)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its fastest kernels
    amp = resolve_amp(cfg.amp, device)  # what auto became, also in results.json
    channels_last = resolve_channels_last(cfg.channels_last, device, inference=cfg.fold_bn)
    real = read_real_labels(cfg.real_labels) if cfg.real_labels else None
    # The data first: a wrong data.root fails in seconds, before any checkpoint download.
    loader, scored = _build_loader(cfg, dist_info, device, channels_last)
    try:
        if cfg.runtime == "onnxruntime":
            net, ckpt_path, model_cfg, checkpoint = _onnxruntime_model(cfg, amp, device)
            param_count = None
        else:
            spec = cfg.model.name if cfg.checkpoint == "released" else cfg.checkpoint
            model, model_cfg, ckpt_path, checkpoint = load_checkpoint_model(
                spec,
                _model_dict(cfg),
                use_ema=cfg.use_ema,
                trusted=cfg.trust_checkpoint,
                hint="; or checkpoint=released: model.name's released weights",
            )
            param_count = count_params(model)  # before BatchNorm folding
            net = _prepare(model, cfg, channels_last, device)
        if cfg.testset or real is not None:
            _check_imagenet1k_classes(model_cfg, checkpoint, cfg.testset or f"real_labels={cfg.real_labels}")
        if loader.num_classes > model_cfg["num_classes"]:
            raise ValueError(
                f"{cfg.data.root} has {loader.num_classes} classes but the model predicts "
                f"{model_cfg['num_classes']}; evaluate on the data set the checkpoint was trained for"
            )
        real_rows = (
            None if real is None else real_label_rows(real, loader.paths, model_cfg["num_classes"], cfg.real_labels)
        )
        result = evaluate(
            net,
            loader,
            device=device,
            amp=amp,
            channels_last=channels_last,
            collect_predictions=cfg.save_predictions,
            progress=cfg.progress,
            tta=cfg.tta,
            class_subset=scored,
            real_labels=real_rows,
        )
        classes = list(loader.classes)
        class_names = class_names_of(source, model_cfg["num_classes"])
    finally:
        loader.close()
    if not dist_info.is_main:
        return None
    name = model_cfg["name"]
    # Published numbers are ImageNet val's; the suite (scripts/eval_suite.py) holds those of the other sets.
    published = None if cfg.testset else published_for(cfg.checkpoint, name) or published_for(ckpt_path, name)
    record = {**to_dict(cfg), "model": model_cfg, "amp": amp, "channels_last": channels_last}
    out = _results({**result, "param_count": param_count}, classes, record, ckpt_path, published, dist_info, device)
    out["class_names"] = class_names  # the model's outputs, in index order
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULTS_FILE).write_text(json.dumps(out, indent=2) + "\n")
        if cfg.save_predictions:
            write_predictions_csv(out_dir / PREDICTIONS_FILE, result["predictions"], class_names)
    return out


def summary_lines(out: dict) -> list[str]:
    """Human-readable lines: measured numbers, and published / measured / delta when published numbers exist."""
    lines = [
        f"{out['model']} on {out['dataset']}: top-1 {out['top1']:.3f}  top-5 {out['top5']:.3f}  "
        f"nll {out['nll']:.4f}  ece {out['ece']:.4f}  on {out['count']} images  ({out['img_per_s']:.1f} img/s, "
        f"world size {out['world_size']})"
    ]
    if out.get("real_count"):
        lines.append(
            f"ReaL: top-1 {out['real_top1']:.3f}  top-5 {out['real_top5']:.3f}  on {out['real_count']} "
            f"images with a non-empty ReaL list"
        )
    p = out["published"]
    if p is not None:
        top5 = (
            ""
            if p["top5"] is None
            else (f"   top-5 published {p['top5']:.3f} measured {out['top5']:.3f} delta {p['delta_top5']:+.3f}")
        )
        lines.append(f"top-1 published {p['top1']:.3f} measured {out['top1']:.3f} delta {p['delta_top1']:+.3f}{top5}")
    return lines
