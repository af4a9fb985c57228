"""Typed schemas of train.py's and evaluate.py's configs, the checks Hydra's types cannot express, and resolvers.

``configs/train.yaml`` composes the groups ``model``, ``data``, ``optim``, ``schedule``, ``trainer`` (and an
``experiment``) on top of ``train_schema``; ``configs/eval.yaml`` composes ``model`` and ``data`` on top of
``eval_schema``. A misspelt key or a value of the wrong type fails at composition, before any data is read; a key
appended with ``+group.key=...`` that the schema lacks (Hydra accepts it) fails in ``check_known_keys``, and each
value's range is checked once, in the ``check_*`` functions below (train.py and evaluate.py call them at start-up).
Every field here is read by ``res2net``.

Resolvers used by ``configs/hydra/default.yaml``:

- ``${res2net.now:FORMAT}``: like Hydra's ``${now:}``, but fixed once per launch (``RES2NET_RUN_TIME``, set by the
  entry point on rank 0 and broadcast to every torchrun rank), so all ranks agree on one run directory.
- ``${res2net.rank_zero_or:VALUE,OTHER}``: VALUE on global rank 0 (env ``RANK``), OTHER on the other ranks.
- ``${res2net.attempt_subdir:OUTPUT_DIR}``: ``.hydra`` for a directory's first launch, ``.hydra/attempt-<time>`` for
  later ones (a resume, a refused attempt), so the first launch's record of its command stays as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from res2net.data.config import Choice, DataConfig, check_data_config
from res2net.errors import CheckpointError, ConfigError

__all__ = [
    "Amp",
    "DistillConfig",
    "Freeze",
    "EvalConfig",
    "LossConfig",
    "LossName",
    "MixupConfig",
    "MixupMode",
    "ModelConfig",
    "OptimConfig",
    "OptimName",
    "RESUME_MAY_DIFFER",
    "RUN_TIME_ENV",
    "ScheduleConfig",
    "ScheduleName",
    "TrainConfig",
    "TrainerConfig",
    "as_eval_config",
    "as_train_config",
    "MAX_SEED",
    "check_checkpoint_position",
    "check_group_choices",
    "check_eval_config",
    "check_known_keys",
    "check_train_config",
    "recorded_run_config",
    "register_configs",
    "run_time",
    "to_dict",
]

RUN_TIME_ENV = "RES2NET_RUN_TIME"


class Amp(Choice):
    auto = "auto"  # bf16 on CUDA GPUs that compute it natively (Ampere and later), off elsewhere (the CPU)
    off = "off"  # fp32 everywhere
    bf16 = "bf16"  # autocast to bfloat16, no loss scaling
    fp16 = "fp16"  # autocast to float16 with a GradScaler (its skipped steps are counted, not errors)


class ScheduleName(Choice):
    step = "step"  # lr * gamma at each milestone epoch (the paper: / 10 at 30, 60, 90)
    cosine = "cosine"  # half-cosine from lr to min_lr over all epochs, per step
    linear = "linear"  # from lr at the warm-up's end straight down to min_lr at the last epoch, per step (FFCV)


class Runtime(Choice):
    torch = "torch"  # the PyTorch model of a checkpoint
    onnxruntime = "onnxruntime"  # an .onnx file from scripts/export.py, run with ONNX Runtime on the CPU in fp32


class Tta(Choice):
    none = "none"
    flip = "flip"  # the softmax averaged over the image and its mirror


class Freeze(Choice):
    none = "none"
    stem = "stem"
    layer1 = "layer1"
    layer2 = "layer2"
    layer3 = "layer3"
    layer4 = "layer4"
    backbone = "backbone"  # everything but the classifier


def auto_or_bool(value: Any, key: str) -> str | bool:
    """An ``auto | true | false`` knob as 'auto', True or False (a YAML or command-line bool, or its text)."""
    text = str(value).lower()
    if text == "auto":
        return "auto"
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"{key}={value!r} is not one of auto, true, false")


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
    # Stochastic depth: the last block's rate, rising linearly from 0 at the first block; null = the variant's 0.
    drop_path_rate: float | None = None
    # Start from weights (train.py; res2net/models/loading.py). pretrained: the variant's released ImageNet weights
    # (the loader create_model(pretrained=True) uses). init_checkpoint: a train.py checkpoint, a released .pth, a
    # .safetensors file, an exported HF folder, an http(s) URL or a variant name; read tensors-only; it wins over
    # pretrained (experiment=finetune sets pretrained=true, init_checkpoint=<file> replaces it). Either one:
    # a classifier of another size is re-initialised (the log names its keys), any other mismatch is an error.
    # Not a resume (fresh optimizer, schedule and RNG); resume=auto on a run directory with a checkpoint wins.
    pretrained: bool = False
    init_checkpoint: str = ""


class OptimName(Choice):
    sgd = "sgd"  # torch.optim.SGD (momentum, nesterov): the paper's
    adamw = "adamw"  # torch.optim.AdamW (betas, eps), decoupled weight decay
    lamb = "lamb"  # LAMB as in ResNet strikes back (res2net.engine.optim.Lamb, timm's Lamb arithmetic)


class LossName(Choice):
    ce = "ce"  # softmax cross-entropy (on soft targets when mixup is on)
    bce = "bce"  # per-class binary cross-entropy on the (mixed, smoothed) targets, as in ResNet strikes back


class MixupMode(Choice):
    batch = "batch"  # one draw (mixup or cutmix, lambda, box) for the whole batch
    pair = "pair"  # one draw per pair of samples (i, n - 1 - i); needs an even batch
    elem = "elem"  # one draw per sample


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    # lr is for a global batch of base_batch images; the trainer uses lr * global_batch / base_batch, with
    # global_batch = data.batch_size x processes x trainer.accum_steps.
    lr: float = 0.1
    base_batch: int = 256
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 1e-4
    # true: no weight decay on norm weights and biases (every 1-D parameter); the paper decays all parameters.
    # With lamb the exempt parameters also skip the trust ratio (timm's Lamb).
    no_decay_norm_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw and lamb: moment decay rates
    eps: float = 1e-8  # adamw and lamb: added to the second moment's root (timm's Lamb default: 1e-6)
    # Per-group learning rates for fine-tuning (res2net/engine/finetune.py): the classifier's lr is lr x
    # head_lr_mult; layer_decay < 1 scales each depth's lr by layer_decay ** (5 - depth) (head 1, layer4 x d, ...,
    # stem x d^5). Both 1 = one lr for every parameter. The weight-decay rules above hold within each group.
    head_lr_mult: float = 1.0
    layer_decay: float = 1.0


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.step
    epochs: int = 100
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # step only
    gamma: float = 0.1  # step only
    min_lr: float = 0.0  # cosine and linear: final lr, absolute (not scaled with the batch)
    # Linear warm-up from warmup_lr to the scheduled lr over this many epochs (fractions allowed), per step; 0 = none.
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0  # lr the warm-up starts from, absolute (not scaled with the batch); timm's warmup_lr


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto (this rank's GPU when torch sees one, else the CPU) | cuda (a GPU or an error) | cpu
    amp: Amp = Amp.auto
    channels_last: Any = "auto"  # auto (on where amp=auto picks bf16) | true | false
    compile: bool = False  # torch.compile the model (after the DDP wrap)
    sync_bn: bool = False  # SyncBatchNorm across ranks; CUDA only (an error on CPU)
    # Exponential moving average of the weights, evaluated alongside them every epoch; 0 = off (e.g. 0.9998).
    ema_decay: float = 0.0
    # true: during the lr warm-up (schedule.warmup_epochs) the EMA is reset to the weights after every step instead
    # of averaging them (torchvision's reference recipe), so it starts averaging from the warmed-up weights.
    ema_warmup_reset: bool = False
    grad_clip: float = 0.0  # max global L2 norm of the gradients; 0 = off
    # Gradient accumulation: one optimizer step per accum_steps loader batches (DDP all-reduces on the last one
    # only); the global batch, which scales the lr, is data.batch_size x processes x accum_steps. Steps, max_steps,
    # save_every_steps and the schedule count optimizer steps; an epoch's last step takes the batches left over.
    accum_steps: int = 1
    log_interval: int = 50  # steps between 'train' records / console lines
    save_every_epochs: int = 1  # write checkpoints/last.pth after every N-th epoch (and always after the last)
    save_every_steps: int = 0  # also write last.pth every N global steps, mid-epoch; 0 = off
    keep_last: int = 3  # bounded history: checkpoints/epoch_XXXX.pth of the last N saved epochs; 0 = none
    max_steps: int = 0  # stop after this many global steps (smoke runs); 0 = no cap
    seed: int = 0
    # Deterministic kernels (torch.use_deterministic_algorithms, no cuDNN benchmark): same seed, same weights.
    deterministic: bool = False
    # Fine-tuning: parameters that get no gradient and stay as initialised: none | stem | layer1 | layer2 |
    # layer3 | layer4 (the stem and every stage up to that one) | backbone (everything but the classifier).
    freeze: Freeze = Freeze.none
    # true: the frozen part's BatchNorm layers stay in eval mode (their running statistics are used, not updated).
    freeze_bn_eval: bool = True

    def __post_init__(self) -> None:
        self.channels_last = auto_or_bool(self.channels_last, "trainer.channels_last")


@dataclass
class MixupConfig:
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the device, after the loader (any backend), with
    # timm's arithmetic: the batch is mixed with itself reversed. On when alpha > 0 or cutmix_alpha > 0. Every draw
    # comes from a generator seeded with (trainer.seed, rank, global step, micro-step), so a resumed run mixes alike.
    alpha: float = 0.0  # mixup's Beta(alpha, alpha); 0 = no mixup
    cutmix_alpha: float = 0.0  # cutmix's Beta(cutmix_alpha, cutmix_alpha); 0 = no cutmix
    prob: float = 1.0  # probability of mixing a batch / pair / sample
    switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    mode: MixupMode = MixupMode.batch
    off_epoch: int = 0  # no mixing from this (0-based) epoch on, label smoothing stays; 0 = mix to the end


@dataclass
class LossConfig:
    name: LossName = LossName.ce
    # Label smoothing: 0.0 as in the paper's text; experiment=paper_release sets the authors' 0.1. With mixup it is
    # folded into the mixed targets (timm's mixup_target).
    label_smoothing: float = 0.0
    # bce only: targets above this become 1, the others 0 (timm's bce_target_thresh); null = soft targets.
    bce_target_thresh: float | None = None
    # bce only: sum over classes, mean over the batch (timm's sum_classes, --bce-sum); false: mean over every
    # (sample, class) pair, timm's default and what ResNet strikes back used.
    bce_sum: bool = False


@dataclass
class DistillConfig:
    # Logit distillation: loss = (1 - alpha) * task loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student /
    # T)). teacher: '' = off; a variant name (its released weights, downloaded into the cache) or the path of a
    # checkpoint written by train.py (its config names the architecture); read tensors-only (weights_only).
    # The teacher runs in eval mode without gradients, under the same autocast, on the same mixed images; it is not
    # part of the checkpoints (a resume loads it again).
    teacher: str = ""
    alpha: float = 0.5
    temperature: float = 1.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Moved to loss.label_smoothing; any value here is refused with a message naming the new key.
    label_smoothing: float | None = None
    # '' = start fresh; 'auto' = the run directory's checkpoints/last.pth if there is one, else start fresh;
    # otherwise the path of a checkpoint written by train.py.
    resume: str = ""
    # Config keys (or key prefixes) a resume may change on purpose beyond the always-allowed ones, e.g.
    # resume_allow=[schedule.epochs] to continue a finished run for more epochs. The log lists what changed: the
    # run is no longer the uninterrupted trajectory of one config.
    resume_allow: list[str] = field(default_factory=list)


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
    channels_last: Any = "auto"  # auto | true | false (same knob as trainer.channels_last)
    compile: bool = False  # torch.compile the prepared model
    # Fold BatchNorm into the convs (res2net.prepare_for_inference); outputs unchanged within float tolerance.
    fold_bn: bool = True
    device: str = "auto"  # auto | cuda | cpu (same knob as trainer.device)
    save_predictions: bool = False  # also write predictions.csv (path, target, top-5 indices and probabilities)
    progress: bool = True  # progress bar on rank 0
    # torch | onnxruntime: run an .onnx file from scripts/export.py (checkpoint=<file>.onnx) with ONNX Runtime on
    # the CPU in fp32 instead of the PyTorch model (model.name names the architecture for the records).
    runtime: Runtime = Runtime.torch
    # ReaL labels (Beyer et al. 2020): the path of real.json, one list of class indices per ImageNet val image in
    # ILSVRC2012_val_00000001 ... order; adds real_top1, real_top5 and real_count (images with a non-empty list).
    real_labels: str | None = None
    tta: Tta = Tta.none  # none | flip (the softmax averaged over the image and its mirror)
    # An evaluation set beyond ImageNet val, set by data=imagenet_v2|imagenet_sketch|imagenet_r|imagenet_a ('' =
    # <data.root>/val/); layouts and scoring: res2net/data/testsets.py.
    testset: str = ""
    testset_variant: str = ""  # imagenet_v2: matched-frequency | threshold-0.7 | top-images

    def __post_init__(self) -> None:
        self.channels_last = auto_or_bool(self.channels_last, "channels_last")


def _typed(cfg: Any, schema: type) -> Any:
    """``cfg`` as an instance of the dataclass ``schema``: an instance as it is; an OmegaConf node or a mapping
    (a mapping's missing keys take the schema's defaults) checked against the schema and converted, once."""
    if isinstance(cfg, schema):
        return cfg
    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.merge(OmegaConf.structured(schema), cfg)
    return OmegaConf.to_object(node)


def as_train_config(cfg: Any) -> TrainConfig:
    """The typed train config of a composed node (train.py), a mapping or a TrainConfig."""
    return _typed(cfg, TrainConfig)


def as_eval_config(cfg: Any) -> EvalConfig:
    """The typed eval config of a composed node (evaluate.py), a mapping or an EvalConfig."""
    return _typed(cfg, EvalConfig)


def to_dict(cfg: Any) -> dict:
    """A plain, resolved dict (enums as their names) of a typed config, an OmegaConf node or a mapping."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    return dict(cfg)


def _finite(key: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        raise ConfigError(f"{key}={value} must be a finite number {bound}{upper}")


# Keys a resume may change without changing the trajectory (where data lives, how often to log or save, when to
# stop, how the step is compiled); any other difference from the checkpoint's config is refused.
RESUME_MAY_DIFFER = (
    "resume",
    "resume_allow",
    "data.root",
    "data.train_shards",  # the same shards, moved: the order depends on the manifest, not the path
    "data.val_shards",
    "data.num_workers",
    "data.prefetch",
    "trainer.log_interval",
    "trainer.save_every_epochs",
    "trainer.save_every_steps",
    "trainer.keep_last",
    "trainer.max_steps",
    "trainer.compile",
)
MAX_SEED = 2**31 - 1  # the widest seed every generator here takes (DALI's is a 32-bit int)


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` (an OmegaConf node or mapping) that the dataclass ``schema`` does not declare, dotted."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for key in node.keys():
        if key not in fields:
            unknown.append(prefix + str(key))
            continue
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and hasattr(node[key], "keys"):
            unknown += _unknown_keys(node[key], type(default), f"{prefix}{key}.")
    return unknown


def check_known_keys(cfg: Any, schema: type) -> None:
    """Refuse keys the schema (TrainConfig / EvalConfig) does not declare: a ``+group.key=value`` override is
    accepted by Hydra even where the typed schema has no such field, and nothing would read it."""
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        first = unknown[0]
        group, _, _ = first.rpartition(".")
        node = OmegaConf.select(OmegaConf.structured(schema), group) if group else OmegaConf.structured(schema)
        known = ", ".join(str(k) for k in node.keys())
        more = f" (and {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(
            f"unknown config key {first}{more}: {schema.__name__} has no such field, so nothing would read it; "
            f"known keys{' of ' + group if group else ''}: {known}"
        )


def check_eval_config(cfg: Any) -> None:
    """evaluate.py's config: no unknown key, usable data values."""
    check_known_keys(cfg, EvalConfig)
    check_data_config(cfg.data, training=False)


def check_train_config(cfg: Any) -> None:
    """Refuse keys the schema does not declare and values its types let through but training cannot use; the error
    names the key and the allowed range."""
    if OmegaConf.is_config(cfg):
        check_known_keys(cfg, TrainConfig)
    t = cfg.trainer
    for key in ("log_interval", "save_every_epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    for key in ("save_every_steps", "keep_last", "max_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    _finite("trainer.grad_clip", t.grad_clip, 0.0)
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"trainer.seed={t.seed} must be in [0, {MAX_SEED}] (2**31 - 1)")
    if t.accum_steps < 1:
        raise ConfigError(f"trainer.accum_steps={t.accum_steps} must be >= 1 (1 = no accumulation)")
    if cfg.label_smoothing is not None:
        raise ConfigError(
            f"label_smoothing={cfg.label_smoothing}: the key moved to loss.label_smoothing; "
            f"write loss.label_smoothing={cfg.label_smoothing} instead"
        )
    _check_loss(cfg.loss)
    _check_mixup(cfg.mixup)
    _check_distill(cfg.distill)
    _finite("optim.lr", cfg.optim.lr, 0.0, low_open=True)
    _finite("optim.weight_decay", cfg.optim.weight_decay, 0.0)
    if not (math.isfinite(cfg.optim.momentum) and 0.0 <= cfg.optim.momentum < 1.0):
        raise ConfigError(
            f"optim.momentum={cfg.optim.momentum} must be in [0, 1), e.g. 0.9 (1 never forgets a gradient)"
        )
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _finite("optim.eps", cfg.optim.eps, 0.0, low_open=True)
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0, got {cfg.optim.momentum}")
    if cfg.optim.base_batch < 1:
        raise ConfigError(f"optim.base_batch={cfg.optim.base_batch} must be >= 1")
    s = cfg.schedule
    if s.epochs < 1:
        raise ConfigError(f"schedule.epochs={s.epochs} must be >= 1")
    _finite("schedule.warmup_epochs", s.warmup_epochs, 0.0)
    if s.warmup_epochs > s.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={s.warmup_epochs} is longer than the run (schedule.epochs={s.epochs}); "
            f"use at most {s.epochs}"
        )
    _finite("schedule.min_lr", s.min_lr, 0.0)
    if s.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"schedule.min_lr={s.min_lr} is above optim.lr={cfg.optim.lr}: the schedule would raise the lr; use a "
            f"value in [0, {cfg.optim.lr}]"
        )
    _finite("schedule.warmup_lr", s.warmup_lr, 0.0)
    _finite("schedule.gamma", s.gamma, 0.0, low_open=True)
    if list(s.milestones) != sorted(s.milestones) or any(m < 0 for m in s.milestones):
        raise ConfigError(f"schedule.milestones={list(s.milestones)} must be increasing epochs >= 0, e.g. [30, 60, 90]")
    check_data_config(cfg.data, training=True)
    _check_finetune(cfg)
    pair_mode = cfg.mixup.mode == MixupMode.pair
    if pair_mode and cfg.data.batch_size % 2 and (cfg.mixup.alpha > 0 or cfg.mixup.cutmix_alpha > 0):
        raise ConfigError(f"mixup.mode=pair mixes samples in pairs: data.batch_size={cfg.data.batch_size} must be even")
    if cfg.model.drop_rate is not None and not 0.0 <= cfg.model.drop_rate < 1.0:
        raise ConfigError(f"model.drop_rate={cfg.model.drop_rate} must be in [0, 1)")
    if t.ema_decay != 0.0 and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay={t.ema_decay} must be in (0, 1), e.g. 0.9998, or 0 to turn the EMA off")
    if t.ema_warmup_reset and t.ema_decay == 0.0:
        raise ConfigError("trainer.ema_warmup_reset=true resets an EMA that is off: set trainer.ema_decay > 0")


def check_checkpoint_position(ckpt: Any, path: Any) -> None:
    """A train.py checkpoint's position and records (epoch, step_in_epoch, global_step, best_top1, meters) are what
    a resume can continue from; a damaged or hand-edited file is refused naming the value."""
    for key in ("epoch", "step_in_epoch", "global_step"):
        value = ckpt.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"cannot resume from {path}: its {key}={value!r} is not a count >= 0 (a damaged file?)"
            )
    if ckpt["step_in_epoch"] > ckpt["global_step"]:
        raise CheckpointError(
            f"cannot resume from {path}: step_in_epoch={ckpt['step_in_epoch']} exceeds "
            f"global_step={ckpt['global_step']} (a damaged file?)"
        )
    best = ckpt.get("best_top1")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or not 0 <= best <= 100):
        raise CheckpointError(f"cannot resume from {path}: its best_top1={best!r} is not a top-1 in [0, 100]")
    meters = ckpt.get("meters")
    if not isinstance(meters, dict) or not all(isinstance(v, (int, float)) for v in meters.values()):
        raise CheckpointError(f"cannot resume from {path}: its meters={meters!r} are not numbers (a damaged file?)")


def _check_finetune(cfg: Any) -> None:
    _finite("optim.head_lr_mult", cfg.optim.head_lr_mult, 0.0, low_open=True)
    _finite("optim.layer_decay", cfg.optim.layer_decay, 0.0, 1.0, low_open=True)
    if not 0.0 <= cfg.data.val_split < 1.0:
        raise ConfigError(f"data.val_split={cfg.data.val_split} must be a fraction in [0, 1) (0 = use <root>/val/)")


def _check_loss(loss: Any) -> None:
    if not 0.0 <= loss.label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing={loss.label_smoothing} must be in [0, 1)")
    if loss.bce_target_thresh is not None:
        _finite("loss.bce_target_thresh", loss.bce_target_thresh, 0.0, 1.0)


def _check_mixup(mixup: Any) -> None:
    _finite("mixup.alpha", mixup.alpha, 0.0)
    _finite("mixup.cutmix_alpha", mixup.cutmix_alpha, 0.0)
    _finite("mixup.prob", mixup.prob, 0.0, 1.0)
    _finite("mixup.switch_prob", mixup.switch_prob, 0.0, 1.0)
    if mixup.off_epoch < 0:
        raise ConfigError(f"mixup.off_epoch={mixup.off_epoch} must be >= 0 (0 = mix until the end)")


def _check_distill(distill: Any) -> None:
    _finite("distill.alpha", distill.alpha, 0.0, 1.0)
    _finite("distill.temperature", distill.temperature, 0.0, low_open=True)


def run_time() -> float:
    """The launch time shared by all ranks (``RES2NET_RUN_TIME``), fixed at first use when unset."""
    if RUN_TIME_ENV not in os.environ:
        os.environ[RUN_TIME_ENV] = repr(time.time())
    return float(os.environ[RUN_TIME_ENV])


def _now(fmt: str) -> str:
    return time.strftime(fmt, time.localtime(run_time()))


def _rank_zero_or(value, other):
    return value if int(os.environ.get("RANK", "0")) == 0 else other


_attempt_subdirs: dict[str, str] = {}


def _attempt_subdir(output_dir: str) -> str:
    """Where Hydra records this launch (config, overrides): ``.hydra`` for the first in a directory, then
    ``.hydra/attempt-<launch time>``, so a later attempt (a resume, a refused one, another evaluation) never rewrites
    the records of the first. Fixed at first use in this process (Hydra writes the directory it names)."""
    if output_dir not in _attempt_subdirs:
        first = not (Path(output_dir) / ".hydra" / "overrides.yaml").exists()
        _attempt_subdirs[output_dir] = ".hydra" if first else f".hydra/attempt-{_now('%Y-%m-%d_%H-%M-%S')}"
    return _attempt_subdirs[output_dir]


def check_group_choices(overrides: list[str], config_dir: str | os.PathLike) -> None:
    """Refuse ``group=option`` overrides whose option has no file in ``config_dir/group/``, in one line with the
    closest names (Hydra's own message lists every option over many lines)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~")
        folder = Path(config_dir) / group
        if not sep or not folder.is_dir() or value in ("", "null") or any(c in value for c in "[],"):
            continue
        if not (folder / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            close = difflib.get_close_matches(value, options, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(
                f"{group}={value}: configs/{group}/ has no {value}.yaml; {hint}options: {', '.join(options)}"
            )


def recorded_run_config(cfg: Any, run_dir: str | os.PathLike, overrides: list[str]) -> Any:
    """For ``resume=auto`` in a run directory that holds ``config.yaml`` (written by the run's last accepted
    attempt) and a command line that names no config group: that recorded config, with the keys the command line
    names and trainer.max_steps (a cap of one attempt, not of the run) taken from ``cfg``, so
    ``train.py hydra.run.dir=<run> resume=auto`` continues the run as it was configured. A command that names a
    group (``experiment=...``, ``data=folder``: the same command again, as a SLURM requeue runs it) states the whole
    config itself: ``cfg`` as composed, checked against the checkpoint as before."""
    path = Path(run_dir) / "config.yaml"
    if cfg.resume != "auto" or not path.is_file():
        return cfg
    keys = [override.partition("=")[0].lstrip("+~") for override in overrides]
    if any(_names_a_group(cfg, key) for key in keys):
        return cfg
    recorded = OmegaConf.load(path)
    schema = OmegaConf.structured(TrainConfig)
    # Records beside the config (e.g. 'init': where the weights came from) are not settings.
    recorded = OmegaConf.masked_copy(recorded, [k for k in recorded if k in schema])
    merged = OmegaConf.merge(schema, recorded)
    for key in [*keys, *_PER_ATTEMPT]:
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    return merged


_ABSENT = object()
_PER_ATTEMPT = ("trainer.max_steps",)  # a smoke run's cap stops that attempt; the resume runs on unless it sets one


def _names_a_group(cfg: Any, key: str) -> bool:
    """Whether an override's key chose a config group (experiment=..., data=folder) rather than set a value."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return value is _ABSENT or OmegaConf.is_dict(value)


def register_configs() -> None:
    """Register the schemas (train_schema, eval_schema) and the resolvers. Idempotent."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    if not OmegaConf.has_resolver("res2net.now"):
        OmegaConf.register_new_resolver("res2net.now", _now)
    if not OmegaConf.has_resolver("res2net.rank_zero_or"):
        OmegaConf.register_new_resolver("res2net.rank_zero_or", _rank_zero_or)
    if not OmegaConf.has_resolver("res2net.attempt_subdir"):
        OmegaConf.register_new_resolver("res2net.attempt_subdir", _attempt_subdir)
