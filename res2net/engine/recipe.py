"""The checkpoint carries its recipe: the evaluation preprocessing (and the val split) of a checkpoint, an exported
folder or an ONNX file, applied to an evaluation's data config unless the command line set the field.

Used by evaluate.py, scripts/eval_suite.py, scripts/export.py and scripts/predict.py; the values come from
``res2net.data.preprocess.preprocessing_of``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from res2net.data.preprocess import Preprocessing, preprocessing_of, published_preprocessing

__all__ = ["ONNX_METADATA_KEY", "apply_recipe", "onnx_record", "source_record"]

log = logging.getLogger(__name__)

# The ONNX metadata_props entry scripts/export.py writes: JSON {"preprocessing": {...}, "classes": [...], "model": ...}
ONNX_METADATA_KEY = "res2net"


def onnx_record(path: str | Path) -> dict:
    """The record scripts/export.py stored in an ONNX file's metadata ({} for a file without one)."""
    from res2net.export import onnx_metadata

    value = onnx_metadata(path).get(ONNX_METADATA_KEY)
    return json.loads(value) if value else {}


def source_record(spec: str, model_name: str | None, trusted: bool = False) -> Mapping:
    """What a checkpoint spec records about itself, as a mapping ``preprocessing_of`` and ``class_names_of`` read:
    a train.py checkpoint, an ONNX file's metadata, an HF folder's config.json, or {} for released weights."""
    from res2net.models.pretrained import read_checkpoint

    if spec == "released" or (model_name is not None and spec == model_name and not Path(spec).exists()):
        return {}
    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        return onnx_record(path)
    if path.is_dir() and (path / "config.json").is_file():  # an exported HF folder
        config = json.loads((path / "config.json").read_text())
        return {**config, "classes": config.get("pretrained_cfg", {}).get("label_names")}
    if path.is_file():
        obj = read_checkpoint(path, trusted=trusted)
        return obj if isinstance(obj, Mapping) else {}
    return {}


def apply_recipe(
    data_cfg: Mapping, record: Mapping, model_name: str | None, keep: Iterable[str] = ()
) -> tuple[dict, Preprocessing]:
    """(``data_cfg`` with the record's evaluation preprocessing, except the ``keep`` fields (set on the command
    line), the preprocessing used). A train.py checkpoint's data.val_split is taken over when the data root is the
    one it was trained on and the command line did not set data.val_split."""
    keep = set(keep)
    data = dict(data_cfg)
    pp = preprocessing_of(record, model_name) if record else published_preprocessing(model_name)
    pp = pp.overridden_by(data, keep & set(pp.to_dict()))
    saved = record.get("config", {}).get("data", {}) if isinstance(record.get("config"), Mapping) else {}
    same_root = saved.get("root") and data.get("root") and Path(saved["root"]).resolve() == Path(data["root"]).resolve()
    if saved.get("val_split") and same_root and "val_split" not in keep:
        data["val_split"] = saved["val_split"]
    data.update(pp.data_overrides())
    log.info(
        "preprocessing: %d px, crop_pct %g (resize %d), %s, mean %s, std %s%s",
        pp.img_size,
        pp.crop_pct,
        pp.resize_size,
        pp.interpolation,
        list(pp.mean),
        list(pp.std),
        f" (command line: {', '.join(sorted(keep))})" if keep else " (the checkpoint's)",
    )
    return data, pp
