"""An op census that runs on the CPU: what a region of code asks of the device, counted at torch's dispatcher.

``Census`` is a TorchDispatchMode that counts, for the code run inside it, the aten ops (each one kernel launch or
more on a GPU; views included), the host reads (ops whose result the host must wait for on a GPU:
``_local_scalar_dense`` behind ``.item()`` / ``bool()`` / ``float()``, ``nonzero`` and boolean-mask indexing,
``equal``, ``is_nonzero``, ``repeat_interleave`` without ``output_size``) and the tensors made from Python data
(``lift_fresh``: ``torch.tensor(...)``, ``torch.from_numpy``, ``torch.as_tensor``; on a GPU each becomes a host-to-
device copy, a blocking one unless it is pinned and non-blocking). A GPU run of the same code shows these as kernel
launches and stream syncs (``torch.cuda.set_sync_debug_mode``), so the counts read against a GPU profile.

``preset_census`` counts one steady-state training step of a training preset (configs/experiment/*.yaml) with its
knobs on: the device augmentation of one batch (TrainAugment.apply_batch, the Normalizer, random erasing: the DALI
path), mixup / CutMix, and the step itself (backward_micro_step + optimizer_step of train_loop, with the preset's loss,
optimizer and EMA) on a reduced model at a small resolution. ``scripts/benchmark.py --census`` prints it per preset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Census", "Counts", "preset_census", "training_presets", "census_table"]

_HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_dim"}
_PYTHON_DATA = {"lift_fresh", "lift_fresh_copy"}


@dataclass
class Counts:
    """What one region asked for: aten ops, host reads, tensors made from Python data; ``by_op`` per op name."""

    ops: int = 0
    host_reads: int = 0
    python_tensors: int = 0
    by_op: Counter = field(default_factory=Counter)

    def reads(self) -> dict[str, int]:
        """The host reads by op name."""
        return {name: n for name, n in self.by_op.items() if name in _HOST_READS or name.startswith("host read:")}


def _is_host_read(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _HOST_READS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # a boolean mask becomes nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name == "repeat_interleave":  # the output size comes from the device unless given
        return kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) and len(args) < 3
    return False


class Census(TorchDispatchMode):
    """``with Census() as census: ...`` then ``census.counts`` (a Counts)."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        counts = self.counts
        counts.ops += 1
        counts.by_op[name] += 1
        if name in _PYTHON_DATA:
            counts.python_tensors += 1
        elif _is_host_read(name, args, kwargs):
            counts.host_reads += 1
            if name not in _HOST_READS:
                counts.by_op[f"host read: {name}"] += 1
        return func(*args, **kwargs)


def count(fn, *args, **kwargs) -> tuple[Any, Counts]:
    """(fn's result, the Counts of running it)."""
    with Census() as census:
        result = fn(*args, **kwargs)
    return result, census.counts


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# A reduced model: the census is about the ops per step, which grow with depth but not with the batch.
TINY_MODEL = ["model.base_width=4", "model.layers=[1,1,1,1]"]


def training_presets() -> list[str]:
    """The training presets of configs/experiment (the sweeps and the debug / demo runs aside)."""
    skip = ("ablation_", "debug", "demo")
    return sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if not p.stem.startswith(skip))


def compose_preset(name: str, overrides: list[str] = ()) -> Any:
    """The train config of ``experiment=name`` with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from res2net.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={name}", *overrides])


@dataclass
class StepCensus:
    """One preset's census at one batch size: per region (augment, mixup, step) and in all."""

    preset: str
    batch_size: int
    img_size: int
    augment: Counts
    mixup: Counts
    step: Counts

    @property
    def total(self) -> Counts:
        out = Counts()
        for part in (self.augment, self.mixup, self.step):
            out.ops += part.ops
            out.host_reads += part.host_reads
            out.python_tensors += part.python_tensors
            out.by_op.update(part.by_op)
        return out


def preset_census(
    name: str, batch_size: int, img_size: int = 32, num_classes: int = 10, overrides: list[str] = ()
) -> StepCensus:
    """The census of one steady-state training step of preset ``name`` on the CPU (see the module docstring): the
    preset's data knobs, loss, mixup, optimizer and EMA, a reduced model, ``batch_size`` images of ``img_size``.
    Two steps run first, so lazily built state (optimizer moments, buffers) is not counted."""
    from res2net.data import as_data_config
    from res2net.data.augment import TrainAugment
    from res2net.data.transforms import Normalizer
    from res2net.models import model_from_config

    from .ema import ModelEma
    from .losses import build_criterion
    from .mixup import Mixup, mixup_enabled
    from .optim import build_optimizer
    from .train_loop import backward_micro_step, optimizer_step

    cfg = compose_preset(name, [*TINY_MODEL, *overrides])
    data = as_data_config(cfg.data)
    data.img_size, data.progressive_sizes, data.progressive_epochs = img_size, None, None
    augment = TrainAugment(data, seed=0)
    device = torch.device("cpu")
    normalize = Normalizer(data.mean, data.std, device, torch.float32, channels_last=False)
    torch.manual_seed(0)
    model = model_from_config(cfg.model, num_classes=num_classes)
    ema = ModelEma(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    optimizer = build_optimizer(model, cfg.optim, batch_size)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    mixup = None
    if mixup_enabled(cfg.mixup):
        mixup = Mixup.from_config(
            cfg.mixup, label_smoothing=cfg.loss.label_smoothing, num_classes=num_classes, seed=0, rank=0
        )
    criterion = build_criterion(cfg.loss, soft_targets=mixup is not None)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, img_size, img_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    model.train()

    def augment_batch(step: int) -> torch.Tensor:
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        plan = augment.plan(0, positions)  # host draws (numpy), as the DALI loader makes them
        x = images.clone()

        def device_work():
            out = augment.apply_batch(x, plan) if plan is not None else x
            return augment.erase(normalize(out), 0, positions)

        return count(device_work)

    def mix(x: torch.Tensor, step: int):
        if mixup is None:
            return (x, labels), Counts()
        return count(mixup, x, labels, epoch=0, step=step)

    def train(x: torch.Tensor, targets: torch.Tensor):
        def run():
            optimizer.zero_grad(set_to_none=True)
            backward_micro_step(model, x, targets, scaler, criterion, amp="off")
            optimizer_step(model, optimizer, scaler, grad_clip=cfg.trainer.grad_clip)
            if ema is not None:
                ema.update(model)

        return count(run)[1]

    for step in range(3):  # two warm-up steps, then the counted one
        x, aug = augment_batch(step)
        (x, targets), mixed = mix(x, step)
        trained = train(x, targets)
    return StepCensus(name, batch_size, img_size, aug, mixed, trained)


def census_table(rows: list[StepCensus]) -> str:
    """A markdown table of censuses: ops / host reads / Python-data tensors per region."""
    lines = [
        "| preset | batch | augment ops | mixup ops | step ops | host reads | Python-data tensors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r.total
        lines.append(
            f"| {r.preset} | {r.batch_size} | {r.augment.ops} | {r.mixup.ops} | {r.step.ops} | "
            f"{total.host_reads} | {total.python_tensors} |"
        )
    return "\n".join(lines)
