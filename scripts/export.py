#!/usr/bin/env python
"""Export a Res2Net classifier as ONNX, TorchScript, safetensors or a Hugging Face hub folder, and check the result.

    python scripts/export.py --model res2net50_26w_4s --checkpoint released --format onnx --out res2net50_26w_4s.onnx
    python scripts/export.py --checkpoint outputs/<run>/checkpoints/best.pth --format hf --out hub/my_model
    python scripts/export.py --model res2net50_26w_4s --checkpoint released --format onnx --quantize int8 \\
        --calibration /data/imagenet/train --check-root /data/imagenet --out res2net50_26w_4s.int8.onnx

The checkpoint carries its recipe: a train.py checkpoint names its model and its evaluation preprocessing (image
size, crop, interpolation, mean, std; released weights: their published values), which the export records (ONNX
metadata 'res2net', HF config.json pretrained_cfg) with the class names; --img-size exports at another size.

onnx: BatchNorm folded, dynamic batch axis, opset 18, onnx.checker, then ONNX Runtime against PyTorch at batch 1 and 2.
torchscript: BatchNorm folded, traced, reloaded and compared. safetensors: the weights only. hf: a folder timm and
res2net.load_pretrained read (config.json, model.safetensors, README.md model card), reloaded and compared.
--quantize int8 (onnx): ONNX Runtime's static quantisation of the checked float32 export (QDQ, per-channel int8
weights, 7-bit with --reduce-range for CPUs without VNNI; uint8 activations), calibrated on --calibration-images
images of the --calibration folder put through the checkpoint's evaluation preprocessing; with --check-root,
float32 and int8 top-1 / top-5 on <root>/val and their top-1 agreement are printed, and a top-1 drop over
--max-drop points is exit status 1 (the file stays written).
Graphs are traced at the checkpoint's evaluation size (a train.py checkpoint's data config; 224 px for released
weights) unless --img-size says otherwise.
Checkpoints are read tensors-only (weights_only=True); a train.py checkpoint brings its own architecture.
Exit status: 0 written and checked; 1 a runtime error (missing file, checkpoint of another architecture, a check
that failed, an int8 accuracy drop over --max-drop); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import res2net
from res2net import export
from res2net.data.classes import class_names_of
from res2net.data.preprocess import preprocessing_of
from res2net.engine.recipe import ONNX_METADATA_KEY
from res2net.models.download import sha256_file
from res2net.models.hub import HUB_REPOS
from res2net.models.loading import load_checkpoint_model
from res2net.models.stats import count_params
from res2net.models.variants import MODEL_KNOBS, RELEASED

TOLERANCE = 1e-4  # largest accepted max|exported - PyTorch| / max|PyTorch|


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"export.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        choices=res2net.list_models(),
        metavar="NAME",
        help=f"variant (default: the one a train.py checkpoint names): {', '.join(res2net.list_models())}",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs (default: the checkpoint's fc size; 1000 for released weights)",
    )
    p.add_argument("--checkpoint", required=True, help="'released' or the path of a .pth / .safetensors file")
    p.add_argument("--format", required=True, choices=export.FORMATS, help=" | ".join(export.FORMATS))
    p.add_argument("--out", required=True, type=Path, help="output file (a folder for --format hf)")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size of the traced graphs and of config.json (default: the checkpoint's evaluation size; "
        "224 for released weights)",
    )
    p.add_argument("--license", default="unknown", help="licence identifier for the hf model card")
    int8 = p.add_argument_group("int8 (--format onnx --quantize int8)")
    int8.add_argument("--quantize", choices=["int8"], default=None, help="write an int8 ONNX file instead of float32")
    int8.add_argument("--calibration", type=Path, default=None, help="folder of training images (searched recursively)")
    int8.add_argument(
        "--calibration-images",
        type=int,
        default=export.CALIBRATION_IMAGES,
        help="images taken, spread evenly over the folder's sorted files (default: %(default)s)",
    )
    int8.add_argument(
        "--calibration-method",
        choices=export.CALIBRATION_METHODS,
        default=export.CALIBRATION_METHOD,
        help="ONNX Runtime's activation range estimate (default: %(default)s)",
    )
    int8.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights: for CPUs without VNNI / AMX (AVX2-only, older AVX512), where full 8-bit weights can "
        "saturate ONNX Runtime's int8 kernels; costs a little accuracy on CPUs that have them",
    )
    int8.add_argument(
        "--check-root", type=Path, default=None, help="data root holding val/<class>/ images to score both files on"
    )
    int8.add_argument(
        "--max-drop", type=float, default=1.0, help="largest accepted int8 top-1 drop in points (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.img_size is not None and args.img_size < 32:
        p.error(f"--img-size must be >= 32, got {args.img_size}")
    if args.quantize and args.format != "onnx":
        p.error(f"--quantize int8 writes ONNX: use --format onnx (got --format {args.format})")
    if args.quantize and args.calibration is None:
        p.error("--quantize int8 needs --calibration <folder of training images>")
    if not args.quantize and (args.calibration is not None or args.check_root is not None or args.reduce_range):
        p.error("--calibration, --check-root and --reduce-range belong to --quantize int8")
    if args.calibration_images < 1:
        p.error(f"--calibration-images must be >= 1, got {args.calibration_images}")
    if args.model is None and args.checkpoint == "released":
        p.error("--checkpoint released needs --model NAME (which variant's released weights)")
    return args


def load_model(name: str | None, num_classes: int | None, checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """(model with the checkpoint's weights, facts for the model card: source, sha256, metrics, recipe, class names,
    evaluation preprocessing). ``name`` None: the model a train.py checkpoint names."""
    spec = name if checkpoint == "released" else checkpoint
    model_cfg = {"name": name, "num_classes": num_classes} if name else None
    # tensors only: an unsafe file is an UnsafeCheckpointError
    model, cfg, path, state = load_checkpoint_model(spec, model_cfg, key="--checkpoint")
    saved = state.get("config") if isinstance(state.get("config"), dict) else None
    saved_model = saved.get("model") if saved and isinstance(saved.get("model"), dict) else {}
    facts = dict(
        name=cfg["name"],
        checkpoint=checkpoint,
        file=path.name,
        sha256=sha256_file(path),
        best_top1=state.get("best_top1"),
        config=saved,
        model_args=export.timm_model_args(saved_model),
        overrides={k: v for k, v in saved_model.items() if k in MODEL_KNOBS},
        classes=class_names_of(state, model.num_classes),
        preprocessing=preprocessing_of(state, cfg["name"]),
    )
    return model.eval(), facts


def model_card(model: torch.nn.Module, facts: dict, license: str) -> str:
    """README.md of the hf folder: what it is, how it was trained and scored, how to load it, its licence."""
    name = facts["name"]
    released = RELEASED.get(name) if facts["checkpoint"] == "released" else None
    if facts["checkpoint"] == "released":
        recipe = (
            f"The released ImageNet-1k weights ({HUB_REPOS[name]}): the paper's recipe (SGD, lr 0.1 per 256 "
            "images, 100 epochs, lr / 10 at epochs 30, 60 and 90); see the Res2Net paper and the official "
            "repository."
        )
    else:
        recipe = f"Trained with the res2net recipe (train.py); checkpoint `{facts['file']}`."
        if facts["config"]:
            recipe += (
                "\n\nTraining config saved in the checkpoint:\n\n```json\n"
                + json.dumps(facts["config"], indent=2, default=str)
                + "\n```"
            )
    if released:
        metrics = (
            f"| top-1 | top-5 |\n|---:|---:|\n| {released.top1:.3f} | {released.top5:.3f} |\n\n"
            "ImageNet-1k val, 50,000 images, 224 px, crop 0.875, bilinear (timm's results table)."
        )
    elif facts["best_top1"] is not None:
        metrics = f"Best validation top-1 during training: {facts['best_top1']:.3f}%."
    else:
        metrics = "Not measured here: run `python evaluate.py checkpoint=<file>` on the validation set."
    timm_args = "".join(f"\n                          {k}={v!r}," for k, v in facts["model_args"].items())
    ours_args = "".join(f", {k}={v!r}" for k, v in facts["overrides"].items() if v is not None)
    return f"""---
tags:
- image-classification
- timm
- res2net
library_name: timm
license: {license}
datasets:
- imagenet-1k
---
# {name}

Res2Net image classifier ({count_params(model):,} parameters, {model.num_classes} classes), exported by the res2net
recipe's `scripts/export.py`. Paper: Gao et al., "Res2Net: A New Multi-Scale Backbone Architecture", TPAMI 2021
(https://arxiv.org/abs/1904.01169). Official code: https://github.com/Res2Net/Res2Net-PretrainedModels.

## Recipe

{recipe}

## Metrics

{metrics}

## Use

Preprocessing: `config.json` (`pretrained_cfg`: input size, interpolation, crop_pct, mean, std).

```python
import timm
weights = "model.safetensors"  # this folder; once uploaded:
# weights = huggingface_hub.hf_hub_download("<user>/<repo>", "model.safetensors")
model = timm.create_model("{name}", pretrained=True, num_classes={model.num_classes},{timm_args}
                          pretrained_cfg_overlay=dict(file=weights, num_classes={model.num_classes}))
# (num_classes in the overlay too: timm drops a classifier whose size differs from its default config's)

import res2net
model = res2net.create_model("{name}", num_classes={model.num_classes}{ours_args})
res2net.load_pretrained(model, weights)
```

Both calls read `model.safetensors` and nothing else. Avoid `timm.create_model("local-dir:<folder>")`: it loads any
`*.pth` / `*.bin` in the folder ahead of `model.safetensors`, fully unpickled, so a file added there runs its code.

Weights: `model.safetensors`, from `{facts["file"]}` (sha256 {facts["sha256"]}).

## Licence

`{license}`. The released Res2Net weights come from the authors (official repository above) and timm; check their
terms before use in a product.
"""


def _check(reloaded, model: torch.nn.Module, out: Path, img_size: int) -> float:
    """max relative error of the reloaded file against PyTorch at batch 1 and 2; a RuntimeError over TOLERANCE."""
    error = export.max_relative_error(reloaded, model, batch_sizes=(1, 2), img_size=img_size)
    if not error < TOLERANCE:
        raise RuntimeError(f"{out}: outputs differ from PyTorch by {error:.2e} (relative, > {TOLERANCE:.0e})")
    return error


def export_and_check(model: torch.nn.Module, facts: dict, args: argparse.Namespace) -> str:
    """Write args.out in args.format, reload it, compare it with the PyTorch model; the line to print."""
    out = args.out
    pp = facts["preprocessing"].overridden(img_size=args.img_size)  # --img-size wins over the checkpoint's
    args.img_size = pp.img_size
    if args.format == "onnx":
        record = {"model": facts["name"], "preprocessing": pp.to_dict(), "classes": facts["classes"]}
        export.export_onnx(model, out, img_size=pp.img_size, metadata={ONNX_METADATA_KEY: json.dumps(record)})
        reloaded = export.OnnxRuntimeModel(out)
        what = f"ONNX opset {export.OPSET}, checked by onnx.checker; ONNX Runtime"
    elif args.format == "torchscript":
        export.export_torchscript(model, out, img_size=args.img_size)
        reloaded, what = torch.jit.load(out), "TorchScript (traced) reloaded"
    else:
        if args.format == "hf":
            export.export_hf(
                model,
                out,
                facts["name"],
                model_card(model, facts, args.license),
                img_size=pp.img_size,
                model_args=facts["model_args"],
                data=export.eval_data_config(pp),
                classes=facts["classes"],
                model_config={"name": facts["name"], **facts["overrides"]},
            )
            weights = out / "model.safetensors"
        else:
            weights = export.export_safetensors(model, out, metadata={"architecture": facts["name"]})
        reloaded = copy.deepcopy(model)
        with torch.no_grad():
            for tensor in reloaded.state_dict().values():
                tensor.zero_()  # only the written file can give the weights back
        res2net.load_pretrained(reloaded, weights)
        what = "weights reloaded by res2net.load_pretrained"
    error = _check(reloaded, model, out, args.img_size)
    return (
        f"wrote {out} ({pp.img_size} px, crop_pct {pp.crop_pct:g}, {pp.interpolation}): {what} vs PyTorch at batch 1 "
        f"and 2: max relative error {error:.1e} (< {TOLERANCE:.0e})"
    )


def check_batches(root: Path, data, num_classes: int):
    """The labelled val/ images of a data root through the evaluation preprocessing ``data``, for --check-root."""
    from res2net.data import build_loader

    if not (root / "val").is_dir():
        raise FileNotFoundError(f"--check-root {root} has no val/ folder; give a data root holding val/<class>/ images")
    loader = build_loader(dataclasses.replace(data, root=str(root), batch_size=32), "val")
    if loader.num_classes > num_classes:
        raise ValueError(f"--check-root {root} has {loader.num_classes} classes but the model predicts {num_classes}")
    return loader


def export_int8(model: torch.nn.Module, facts: dict, args: argparse.Namespace) -> tuple[list[str], float | None]:
    """Write args.out as int8 ONNX (calibrated on args.calibration), check the float32 export it comes from against
    PyTorch and the int8 file at batch 1 and 3, and with args.check_root score both; (lines to print, top-1 drop)."""
    out, data = args.out, export.eval_data_config(facts["preprocessing"].overridden(img_size=args.img_size))
    # Bad folders fail before the work.
    files = export.calibration_files(args.calibration, args.calibration_images)
    checks = None if args.check_root is None else check_batches(args.check_root, data, model.num_classes)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        float_file = export.export_onnx(model, Path(tmp) / "float32.onnx", img_size=args.img_size)
        reference = export.OnnxRuntimeModel(float_file)
        error = _check(reference, model, float_file, args.img_size)
        start = time.perf_counter()
        export.quantize_int8(float_file, out, files, data, args.calibration_method, args.reduce_range)
        seconds = time.perf_counter() - start
    quantized = export.OnnxRuntimeModel(out)
    for batch_size in (1, 3):  # the batch axis stays dynamic
        logits = quantized(torch.zeros(batch_size, 3, args.img_size, args.img_size))
        if tuple(logits.shape) != (batch_size, model.num_classes):
            raise RuntimeError(f"{out}: int8 model gives shape {tuple(logits.shape)} for a batch of {batch_size}")
    lines = [
        f"wrote {out}: int8 (ONNX Runtime static quantisation, QDQ, per-channel "
        f"{'7-bit weights' if args.reduce_range else 'weights'}), {args.calibration_method} "
        f"calibration on {len(files)} images of {args.calibration} at {args.img_size} px (crop {data.crop_pct}, "
        f"{data.interpolation}) in {seconds:.1f} s; its float32 export vs PyTorch: max relative error {error:.1e}"
    ]
    if checks is None:
        return lines, None
    r = export.compare_predictions(reference, quantized, checks)
    drop = r["reference_top1"] - r["candidate_top1"]
    lines.append(
        f"check on {args.check_root / 'val'} ({r['count']} images): float32 top-1 {r['reference_top1']:.2f} "
        f"top-5 {r['reference_top5']:.2f} | int8 top-1 {r['candidate_top1']:.2f} top-5 {r['candidate_top5']:.2f} | "
        f"top-1 agreement {r['agreement']:.2f}% | top-1 drop {drop:.2f} points (--max-drop {args.max_drop:g})"
    )
    return lines, drop


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model, facts = load_model(args.model, args.num_classes, args.checkpoint)
        args.img_size = args.img_size or facts["preprocessing"].img_size
        if args.quantize:
            lines, drop = export_int8(model, facts, args)
            print("\n".join(lines))
            if drop is not None and drop > args.max_drop:
                raise RuntimeError(
                    f"int8 top-1 is {drop:.2f} points below float32 on {args.check_root / 'val'} (--max-drop "
                    f"{args.max_drop:g}); {args.out} is written: try --calibration-method or more --calibration-images"
                )
        else:
            print(export_and_check(model, facts, args))
    except (ValueError, RuntimeError, OSError, ImportError) as err:
        print(f"export.py: error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
