"""Checkpoint files on disk: read any of them tensors-only (told apart when empty, truncated, damaged, not a
checkpoint, or holding more than tensors) and load a state_dict into a model with a report of the keys that do not
fit. Fetching the released files is ``res2net.models.download``; ``res2net.models.loading`` turns a spec into a model
with both.
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from res2net.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["extract_state_dict", "load_weights", "read_checkpoint", "truncated_archive"]

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema")
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")  # left by DistributedDataParallel and torch.compile
_REPORT_FIRST = 5


def truncated_archive(path: Path) -> bool:
    """Whether the file starts like a zip archive (torch.save's format) but lacks the end record."""
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC and not zipfile.is_zipfile(path)


def _damaged_member(path: Path) -> str | None:
    """What is wrong with a torch.save zip archive whose members fail their CRC-32 check (every member is read
    once: about as long as loading it), or None when they all pass or the file is not a zip archive (older torch
    files have no checksums)."""
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, UnicodeDecodeError) as err:  # damaged header
        return f"its zip structure is broken ({_first_line(err)})"
    return None if bad is None else f"member {bad} fails its CRC-32 check"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(checkpoint: Mapping, use_ema: bool = False, origin: str = "checkpoint") -> dict:
    """The model weights in a checkpoint, with 'module.' / '_orig_mod.' prefixes removed.

    Accepts a plain state_dict or a training checkpoint holding it under 'model', 'state_dict' or
    'state_dict_ema' (first present wins); ``use_ema`` takes 'ema' / 'state_dict_ema' / 'model_ema' instead.
    """
    state = checkpoint
    keys = _EMA_KEYS if use_ema else _WRAPPER_KEYS
    while isinstance(state, Mapping) and not _is_state_dict(state):
        key = next((k for k in keys if isinstance(state.get(k), Mapping)), None)
        if key is None:
            if use_ema and any(k in state for k in keys):  # train.py writes ema: None when the EMA was off
                raise CheckpointError(
                    f"{origin} has no EMA weights: its run trained without them (trainer.ema_decay=0); evaluate "
                    f"its weights without use_ema=true"
                )
            wanted = "EMA weights under " if use_ema else "a state_dict or a dict with weights under "
            found = sorted(str(k) for k, v in state.items() if v is not None)
            raise CheckpointError(
                f"{origin} holds no model weights: expected {wanted}one of {list(keys)}, found keys {found[:10]}"
            )
        state = state[key]
    if not _is_state_dict(state):
        raise CheckpointError(f"{origin} holds no model weights (a mapping of tensors), got {type(state).__name__}")
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _key_report(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> str | None:
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (files written by older PyTorch lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or shaped):
        return None
    lines = [f"{origin} does not fit this {type(model).__name__}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", shaped)):
        if items:
            more = f", ... ({len(items) - _REPORT_FIRST} more)" if len(items) > _REPORT_FIRST else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:_REPORT_FIRST])}{more}")
    lines.append(
        "Build the model the checkpoint was made for (same name and overrides, e.g. num_classes) "
        "or pass a checkpoint of this architecture."
    )
    return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> object:
    """The object in a checkpoint file (on the CPU): .safetensors, or a torch file read tensors-only.

    Raises ``CheckpointError`` naming the file and what is wrong with it (a directory, empty, a truncated archive,
    not a checkpoint at all) and its subclass ``UnsafeCheckpointError`` for a file that only Python's full unpickler
    reads, which can run arbitrary code while loading. ``trusted=True`` reads such a file anyway: only for a file
    whose origin you trust. FileNotFoundError when there is no such path.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if truncated_archive(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated: the zip archive torch.save writes lacks its end record (an interrupted "
            "download, copy or write); fetch or copy the file again"
        )
    damaged = _damaged_member(path)
    if damaged:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {damaged} (bytes changed on disk or in a copy); fetch or copy it again, "
            "or use an earlier checkpoint (a train.py run keeps checkpoints/epoch_*.pth)"
        )
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise beside the error said below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a damaged file as UnpicklingError, RuntimeError, EOFError, IndexError...
        if not _pickled(path):
            raise CheckpointError(
                f"checkpoint {path} is not a PyTorch checkpoint: neither a torch.save archive nor a pickle"
            ) from None
        if not isinstance(err, pickle.UnpicklingError):
            raise CheckpointError(
                f"checkpoint {path} is damaged or not a PyTorch checkpoint: {_first_line(err)}"
            ) from None
        refusal = _refusal(err)
    # The project's one full unpickling, only for a file the caller vouched for: trusted=True passed to
    # load_pretrained / load_checkpoint_model / Predictor, or evaluate.py trust_checkpoint=true (every default False).
    if not trusted:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was not loaded: it holds objects other than tensors and plain containers "
            f"({refusal}), and reading it needs Python's full unpickler, which can run arbitrary code "
            "while loading.\nIf you trust the file's origin: res2net.load_pretrained(model, source, "
            "trusted=True), or evaluate.py trust_checkpoint=true"
        )
    logger.warning("%s holds more than tensors; loading it with Python's full unpickler (trusted=True)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a trusted file can still be damaged
        raise CheckpointError(f"checkpoint {path} could not be unpickled: {_first_line(err)}") from err


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file; name a file in it (a train.py run directory "
            "keeps checkpoints/last.pth and checkpoints/best.pth)"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): an interrupted download, copy or write; fetch or copy it again"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _refusal(err: pickle.UnpicklingError) -> str:
    """What the tensors-only reader refused, from torch's message: 'posix.system', 'pickle opcode 149', ..."""
    text = str(err)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it refers to {found.group(1)}"
    if found := re.search(r"Unsupported operand (\d+)", text):
        return f"pickle opcode {found.group(1)}"
    return "refused by torch.load(weights_only=True)"


def _pickled(path: Path) -> bool:
    """Whether the file is a pickle torch.load reads, parsed opcode by opcode with nothing executed: a zip archive
    whose data.pkl is one well-formed pickle, or a file whose first pickle is torch's legacy magic number or calls a
    global (what the tensors-only reader refuses). Tells a refused file apart from one that is not a checkpoint at
    all: random bytes now and then parse as a short pickle of plain data, so a parse alone does not say "pickle"."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if member is None:
                    return False
                with archive.open(member) as f:
                    return _opcodes(f) is not None and not f.read(1)
        with open(path, "rb") as f:
            ops = _opcodes(f) or []
        return any(arg == torch.serialization.MAGIC_NUMBER or name in _CALLS for name, arg in ops)
    except Exception:  # a damaged archive: zipfile raises BadZipFile, UnicodeDecodeError, EOFError, ...
        return False


_CALLS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def _opcodes(stream) -> list[tuple[str, object]] | None:
    """(name, argument) of one pickle's opcodes, or None where the stream does not hold a well-formed pickle."""
    try:
        return [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    except Exception:  # pickletools raises ValueError and others for anything that is not a pickle
        return None


def _load_safetensors(path: Path) -> dict:
    # The hub copies (timm/<name>.in1k, the only home of res2net50d / res2net101d weights) are safetensors files.
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"loading {path} needs the safetensors package: .venv/bin/pip install safetensors") from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises SafetensorError (and others) for a damaged header or data
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {_first_line(err)}") from None


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str = "the given state_dict") -> None:
    """``model.load_state_dict(state, strict=True)``, or CheckpointError naming ``origin`` and listing missing,
    unexpected and wrongly shaped keys."""
    report = _key_report(model, state, origin)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state, strict=True)
