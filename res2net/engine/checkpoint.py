"""Checkpoint files: atomic writes, last / best / bounded history, RNG states, and resume compatibility checks.

A checkpoint is a dict (see ``CHECKPOINT_KEYS``) that ``torch.load(..., weights_only=True)`` reads. Its ``model``
entry is a plain state_dict (no ``module.`` / ``_orig_mod.`` prefixes) that loads strictly into
``res2net.create_model`` and ``timm.create_model`` of the same variant.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from res2net.config import RESUME_MAY_DIFFER, check_checkpoint_position
from res2net.engine.distributed import DistInfo
from res2net.errors import CheckpointError
from res2net.files import atomic_write, remove_stale_temporaries, temporary_path
from res2net.models.pretrained import read_checkpoint

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "CheckpointManager",
    "RESUME_MAY_DIFFER",
    "capture_rng",
    "check_compatible",
    "checkpoint_dir",
    "gather_rng",
    "last_checkpoint",
    "load_checkpoint",
    "resolve_resume",
    "restore_rng",
    "restore_training",
    "save_atomic",
    "training_checkpoint",
]

log = logging.getLogger(__name__)

LAST_FILE = "last.pth"
# "epoch", "step_in_epoch", "global_step", "best_top1", "meters" are the TrainState (res2net.engine.train_loop).
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "ema",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
    "config",
    "best_top1",
    "world_size",
    "meters",
)

# Config keys that may change between a run and its resumption without changing its trajectory (or that only
# extend it); any other difference is refused. Prefixes end with a dot.


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    _write(Path(path), lambda f: torch.save(obj, f))


def _copy_atomic(src: Path, dst: Path) -> None:
    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, length=16 << 20)

    _write(dst, copy)


def _write(path: Path, write) -> None:
    try:
        with atomic_write(path) as f:
            write(f)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        previous = f"the previous {path} is intact" if path.exists() else f"there was no previous {path.name}"
        raise CheckpointError(
            f"could not write checkpoint {path} (temporary file {temporary_path(path)}): {err}; {previous}. "
            f"Free disk space or make {path.parent} writable, then resume with resume=auto"
        ) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by train.py, on the CPU, read tensors-only (``read_checkpoint``: never a file that needs
    the full unpickler, as train.py never writes one); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass resume=auto or the path of a checkpoint "
            f"written by train.py (<run dir>/checkpoints/last.pth)"
        )
    ckpt = read_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a train.py checkpoint: it lacks {missing}; to start from released "
            f"weights use model.name and res2net.load_pretrained instead of resume"
        )
    return ckpt


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where train.py keeps a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint at a run's latest position, which resume=auto continues."""
    return checkpoint_dir(run_dir) / LAST_FILE


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None for '' (fresh start) and for 'auto' without a last.pth yet."""
    if not resume:
        return None
    if resume == "auto":
        last = last_checkpoint(run_dir)
        return last if last.is_file() else None
    path = Path(resume)
    if not path.exists():  # a directory or a damaged file: load_checkpoint says what is wrong with it
        raise FileNotFoundError(
            f"resume={resume!r}: no such checkpoint file; use resume=auto to continue the run "
            f"directory's checkpoints/last.pth, or the path of a .pth file written by train.py"
        )
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _may_differ(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_compatible(
    saved: Mapping,
    current: Mapping,
    *,
    path: str | Path = "checkpoint",
    allowed: Iterable[str] = RESUME_MAY_DIFFER,
    defaults: Mapping | None = None,
) -> None:
    """Refuse to resume when resolved configs differ beyond ``allowed`` keys; the error lists every difference.

    A key the checkpoint lacks (it predates the knob) is no difference while the run keeps that knob at its
    ``defaults`` value, which reproduces the behaviour before the knob existed.
    """
    old, new, default = _flatten(saved), _flatten(current), _flatten(defaults or {})

    def differs(key: str) -> bool:
        if key not in old and key in default and new.get(key) == default[key]:
            return False
        return old.get(key, "<absent>") != new.get(key, "<absent>")

    differ = sorted(key for key in old.keys() | new.keys() if differs(key) and not _may_differ(key, allowed))
    if differ:
        lines = "; ".join(
            f"{key}: checkpoint {old.get(key, '<absent>')!r} vs now {new.get(key, '<absent>')!r}" for key in differ
        )
        raise CheckpointError(
            f"cannot resume from {path}: it was written with a different config ({lines}). "
            f"Resume with the checkpoint's settings, or start a new run directory "
            f"(resume='') to train with these"
        )


def capture_rng() -> dict[str, Any]:
    """The states of python's, numpy's, torch's and this process's CUDA device's generators (weights_only-loadable).

    Only the current CUDA device: under torchrun each rank owns one, and touching the others would create a CUDA
    context on every GPU from every rank.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    elif state["cuda"]:
        log.warning(
            "the checkpoint holds a CUDA generator state but this process has no GPU; CUDA-side random "
            "draws will differ from the interrupted run"
        )


def gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's generator states on every rank, in rank order (rank r resumes with entry r). A collective."""
    state = capture_rng()
    if dist.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def training_checkpoint(run: Any, rng: list, config: Mapping) -> dict[str, Any]:
    """The dict train.py writes from a ``train_loop.Run``: the plain network's weights, optimizer, scaler, EMA,
    TrainState, every rank's RNGs, the config, and the class names (the training data's class folders: index i is
    output i)."""
    classes = getattr(run.train_loader, "classes", None)
    return {
        "classes": list(classes) if classes is not None else None,
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rng": rng,
        "config": dict(config),
        "world_size": run.dist.world_size,
        **run.state.state_dict(),
    }


def weights_mismatch(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor], first: int = 3) -> str:
    """How ``saved`` tensors differ from a model's ``expected`` state dict, in one line ('' when they fit)."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    parts = []
    for title, items in (("shapes differ", shapes), ("missing", missing), ("unexpected", extra)):
        if items:
            more = f" and {len(items) - first} more" if len(items) > first else ""
            parts.append(f"{title}: {'; '.join(items[:first])}{more}")
    return "; ".join(parts)


def restore_training(ckpt: Mapping[str, Any], path: Path, run: Any) -> None:
    """Load a ``training_checkpoint`` into the run's objects and this rank's generators; errors name the file."""
    if ckpt["world_size"] != run.dist.world_size:
        raise ValueError(
            f"cannot resume from {path}: it was written by {ckpt['world_size']} processes, this run "
            f"has {run.dist.world_size}; the data order and steps per epoch depend on it. Resume "
            f"with {ckpt['world_size']} processes"
        )
    check_checkpoint_position(ckpt, path)
    mismatch = weights_mismatch(ckpt["model"], run.net.state_dict())
    if mismatch:
        raise CheckpointError(
            f"cannot resume from {path}: its weights do not fit the configured model ({mismatch}); resume with the "
            f"model settings the run was started with, or train another head from these weights in a new run with "
            f"model.init_checkpoint={path}"
        )
    run.net.load_state_dict(ckpt["model"], strict=True)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None:
        if ckpt["ema"] is None:
            raise ValueError(
                f"cannot resume from {path} with trainer.ema_decay={run.ema.decay}: the checkpoint has no EMA weights"
            )
        run.ema.load_state_dict(ckpt["ema"])
    run.state.load_state_dict(ckpt)
    restore_rng(ckpt["rng"][run.dist.rank])


class CheckpointManager:
    """Writes ``<dir>/last.pth``, ``best.pth`` and a bounded history ``epoch_XXXX.pth`` (rank 0 only)."""

    def __init__(self, directory: str | Path, keep_last: int):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.last = self.dir / LAST_FILE
        self.best = self.dir / "best.pth"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"cannot create the checkpoint folder {self.dir}: {err}") from err
        remove_stale_temporaries(self.dir)  # left by a write that was killed

    def save(self, state: Mapping[str, Any], *, is_best: bool = False, epoch_end: bool = False) -> Path:
        """Write last.pth; copy it to best.pth when ``is_best`` and to the history when ``epoch_end``."""
        save_atomic(dict(state), self.last)
        if is_best:
            _copy_atomic(self.last, self.best)
        if epoch_end and self.keep_last > 0:
            _copy_atomic(self.last, self.dir / f"epoch_{state['epoch']:04d}.pth")
            for old in sorted(self.dir.glob("epoch_*.pth"))[: -self.keep_last]:
                old.unlink()
        return self.last
