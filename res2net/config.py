"""Typed schemas of train.py's and evaluate.py's configs, the checks Hydra's types cannot express, and resolvers.

``configs/train.yaml`` composes the groups ``model``, ``data``, ``optim``, ``schedule``, ``trainer`` (and an
``experiment``) on top of ``train_schema``; ``configs/eval.yaml`` composes ``model`` and ``data`` on top of
``eval_schema``. A misspelt key or a value of the wrong type fails at composition, before any data is read.
Every field here is read by ``res2net``.

Resolvers used by ``configs/hydra/default.yaml``:

- ``${res2net.now:FORMAT}``: like Hydra's ``${now:}``, but fixed once per launch (``RES2NET_RUN_TIME``, set by the
  entry point on rank 0 and broadcast to every torchrun rank), so all ranks agree on one run directory.
- ``${res2net.rank_zero_or:VALUE,OTHER}``: VALUE on global rank 0 (env ``RANK``), OTHER on the other ranks.
"""

from __future__ import annotations

import enum
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from res2net.data.config import DataConfig
from res2net.errors import ConfigError

__all__ = [
    "Amp",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RUN_TIME_ENV",
    "ScheduleConfig",
    "ScheduleName",
    "TrainConfig",
    "TrainerConfig",
    "check_train_config",
    "register_configs",
    "run_time",
    "to_dict",
]

RUN_TIME_ENV = "RES2NET_RUN_TIME"


class Amp(enum.Enum):
    auto = "auto"  # bf16 on CUDA GPUs that compute it natively (Ampere and later), off elsewhere (the CPU)
    off = "off"  # fp32 everywhere
    bf16 = "bf16"  # autocast to bfloat16, no loss scaling
    fp16 = "fp16"  # autocast to float16 with a GradScaler (its skipped steps are counted, not errors)


class ScheduleName(enum.Enum):
    step = "step"  # lr * gamma at each milestone epoch (the paper: / 10 at 30, 60, 90)
    cosine = "cosine"  # half-cosine from lr to min_lr over all epochs, per step


@dataclass
class ModelConfig:
    # A name from res2net.list_models(). Every other field left at null takes the variant's own value
    # (res2net/models/variants.py), so configs/model/*.yaml state only the name and what differs.
    name: str = MISSING
    num_classes: int | None = None  # null: the number of class folders of the training data
    layers: list[int] | None = None  # blocks per stage
    base_width: int | None = None  # channels per split in the first stage
    scale: int | None = None  # number of splits
    cardinality: int | None = None  # groups of the 3x3 convs (Res2NeXt)
    stem: str | None = None  # '' (7x7 conv) | 'deep' (three 3x3 convs, the 'd' variants)
    avg_down: bool | None = None  # avg-pool before the shortcut's 1x1 conv (the 'd' variants)
    zero_init_last: bool | None = None  # zero the last BN of each block
    drop_rate: float | None = None  # dropout before the classifier


@dataclass
class OptimConfig:
    # SGD. lr is for a global batch of base_batch images; the trainer uses lr * global_batch / base_batch.
    lr: float = 0.1
    base_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # true: no weight decay on norm weights and biases (every 1-D parameter); the paper decays all parameters.
    no_decay_norm_bias: bool = False


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.step
    epochs: int = 100
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # step only
    gamma: float = 0.1  # step only
    min_lr: float = 0.0  # cosine only: final lr, absolute (not scaled with the batch)
    # Linear warm-up from ~0 to the scheduled lr over this many epochs (fractions allowed), per step; 0 = none.
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto (this rank's GPU when torch sees one, else the CPU) | cuda (a GPU or an error) | cpu
    amp: Amp = Amp.auto
    channels_last: str = "auto"  # auto (on where amp=auto picks bf16) | true | false
    compile: bool = False  # torch.compile the model (after the DDP wrap)
    sync_bn: bool = False  # SyncBatchNorm across ranks; CUDA only (an error on CPU)
    # Exponential moving average of the weights, evaluated alongside them every epoch; 0 = off (e.g. 0.9998).
    ema_decay: float = 0.0
    grad_clip: float = 0.0  # max global L2 norm of the gradients; 0 = off
    log_interval: int = 50  # steps between 'train' records / console lines
    save_every_epochs: int = 1  # write checkpoints/last.pth after every N-th epoch (and always after the last)
    save_every_steps: int = 0  # also write last.pth every N global steps, mid-epoch; 0 = off
    keep_last: int = 3  # bounded history: checkpoints/epoch_XXXX.pth of the last N saved epochs; 0 = none
    max_steps: int = 0  # stop after this many global steps (smoke runs); 0 = no cap
    seed: int = 0
    # Deterministic kernels (torch.use_deterministic_algorithms, no cuDNN benchmark): same seed, same weights.
    deterministic: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Cross-entropy label smoothing: 0.0 as in the paper's text; experiment=paper_release sets the authors' 0.1.
    label_smoothing: float = 0.0
    # '' = start fresh; 'auto' = the run directory's checkpoints/last.pth if there is one, else start fresh;
    # otherwise the path of a checkpoint written by train.py.
    resume: str = ""


@dataclass
class EvalConfig:
    # The same model/ and data/ groups as training, so evaluate.py composes the files train.py does.
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # 'released': the released file of model.name (downloaded and verified into the cache if missing);
    # otherwise the path of a released file or of any checkpoint train.py wrote.
    checkpoint: str = "released"
    # true: also read a checkpoint that needs Python's full unpickler, which can run arbitrary code while loading;
    # only for a file whose origin you trust (every file train.py writes loads without it).
    trust_checkpoint: bool = False
    use_ema: bool = False  # evaluate the EMA weights of a train.py checkpoint
    amp: Amp = Amp.auto  # autocast dtype of the forward pass (same knob as trainer.amp)
    channels_last: str = "auto"  # auto | true | false (same knob as trainer.channels_last)
    compile: bool = False  # torch.compile the prepared model
    # Fold BatchNorm into the convs (res2net.prepare_for_inference); outputs unchanged within float tolerance.
    fold_bn: bool = True
    device: str = "auto"  # auto | cuda | cpu (same knob as trainer.device)
    save_predictions: bool = False  # also write predictions.csv (path, target, top-5 indices and probabilities)
    progress: bool = True  # progress bar on rank 0
    # ReaL labels (Beyer et al. 2020): the path of real.json, one list of class indices per ImageNet val image in
    # ILSVRC2012_val_00000001 ... order; adds real_top1, real_top5 and real_count (images with a non-empty list).
    real_labels: str | None = None
    tta: str = "none"  # none | flip (the softmax averaged over the image and its mirror)
    # An evaluation set beyond ImageNet val, set by data=imagenet_v2|imagenet_sketch|imagenet_r|imagenet_a ('' =
    # <data.root>/val/); layouts and scoring: res2net/data/testsets.py.
    testset: str = ""
    testset_variant: str = ""  # imagenet_v2: matched-frequency | threshold-0.7 | top-images


def to_dict(cfg: Any) -> dict:
    """A plain, resolved dict (enums as their names) of an OmegaConf node, a dataclass-like mapping or a dict."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    return dict(cfg)


def _finite(key: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        raise ConfigError(f"{key}={value} must be a finite number {bound}{upper}")


def check_train_config(cfg: Any) -> None:
    """Refuse values the schema's types let through but training cannot use; the error names the key."""
    t = cfg.trainer
    for key in ("log_interval", "save_every_epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    for key in ("save_every_steps", "keep_last", "max_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    _finite("trainer.grad_clip", t.grad_clip, 0.0)
    if not 0.0 <= cfg.label_smoothing < 1.0:  # NaN fails too
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    if t.seed < 0:
        raise ConfigError(f"trainer.seed={t.seed} must be >= 0")
    _finite("optim.lr", cfg.optim.lr, 0.0, low_open=True)
    _finite("optim.weight_decay", cfg.optim.weight_decay, 0.0)
    _finite("optim.momentum", cfg.optim.momentum, 0.0, 1.0)
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0, got {cfg.optim.momentum}")
    if cfg.optim.base_batch < 1:
        raise ConfigError(f"optim.base_batch={cfg.optim.base_batch} must be >= 1")
    s = cfg.schedule
    if s.epochs < 1:
        raise ConfigError(f"schedule.epochs={s.epochs} must be >= 1")
    _finite("schedule.warmup_epochs", s.warmup_epochs, 0.0)
    _finite("schedule.min_lr", s.min_lr, 0.0)
    _finite("schedule.gamma", s.gamma, 0.0, low_open=True)
    if list(s.milestones) != sorted(s.milestones):
        raise ConfigError(f"schedule.milestones={list(s.milestones)} must be increasing")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    _finite("data.crop_pct", cfg.data.crop_pct, 0.0, 1.0, low_open=True)
    if cfg.data.img_size < 1:
        raise ConfigError(f"data.img_size={cfg.data.img_size} must be >= 1")
    for i, (mean, std) in enumerate(zip(cfg.data.mean, cfg.data.std)):
        if not math.isfinite(mean):
            raise ConfigError(f"data.mean[{i}]={mean} must be a finite number")
        _finite(f"data.std[{i}]", std, 0.0, low_open=True)
    if cfg.model.drop_rate is not None and not 0.0 <= cfg.model.drop_rate < 1.0:
        raise ConfigError(f"model.drop_rate={cfg.model.drop_rate} must be in [0, 1)")
    if t.ema_decay != 0.0 and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay={t.ema_decay} must be in (0, 1), e.g. 0.9998, or 0 to turn the EMA off")


def run_time() -> float:
    """The launch time shared by all ranks (``RES2NET_RUN_TIME``), fixed at first use when unset."""
    if RUN_TIME_ENV not in os.environ:
        os.environ[RUN_TIME_ENV] = repr(time.time())
    return float(os.environ[RUN_TIME_ENV])


def _now(fmt: str) -> str:
    return time.strftime(fmt, time.localtime(run_time()))


def _rank_zero_or(value, other):
    return value if int(os.environ.get("RANK", "0")) == 0 else other


def register_configs() -> None:
    """Register the schemas (train_schema, eval_schema) and the resolvers. Idempotent."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    if not OmegaConf.has_resolver("res2net.now"):
        OmegaConf.register_new_resolver("res2net.now", _now)
    if not OmegaConf.has_resolver("res2net.rank_zero_or"):
        OmegaConf.register_new_resolver("res2net.rank_zero_or", _rank_zero_or)
