"""Typed schema of the training config (``train.py``), registered in Hydra's ConfigStore.

``configs/config.yaml`` composes the groups ``model``, ``data``, ``optim``, ``schedule``, ``trainer`` (and an optional
``experiment``) on top of ``train_schema``, so a misspelt key or a value of the wrong type in a YAML file or an
override fails at composition time with Hydra's message, before any data is read. Every field here is read by
``res2net.engine``.

Also registers two OmegaConf resolvers used by ``configs/config.yaml``:

- ``${res2net.now:FORMAT}``: like Hydra's ``${now:}``, but the time is fixed once per launch (``RES2NET_RUN_TIME``,
  seconds since the epoch, set by ``train.py`` on rank 0 and broadcast to every torchrun rank), so all ranks of a job
  agree on one run directory.
- ``${res2net.rank_zero_or:VALUE,OTHER}``: VALUE on global rank 0 (env ``RANK``), OTHER on the other ranks; keeps
  Hydra's ``.hydra/`` folder and log file to rank 0.
"""
from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from res2net.data.config import DataConfig

__all__ = ["Amp", "ModelConfig", "OptimConfig", "RUN_TIME_ENV", "ScheduleConfig", "ScheduleName", "TrainConfig",
           "TrainerConfig", "register_configs", "run_time"]

RUN_TIME_ENV = "RES2NET_RUN_TIME"


class Amp(enum.Enum):
    off = "off"    # fp32 everywhere
    bf16 = "bf16"  # autocast to bfloat16, no loss scaling
    fp16 = "fp16"  # autocast to float16 with a GradScaler (its skipped steps are counted, not errors)


class ScheduleName(enum.Enum):
    step = "step"      # lr * gamma at each milestone epoch (the paper: / 10 at 30, 60, 90)
    cosine = "cosine"  # half-cosine from lr to min_lr over all epochs, per step


@dataclass
class ModelConfig:
    # A name from res2net.list_models(); the other fields are that variant's arguments, stated in configs/model/.
    name: str = MISSING
    # null: the number of class folders of the training data.
    num_classes: Optional[int] = None
    layers: List[int] = MISSING
    base_width: int = MISSING
    scale: int = MISSING
    cardinality: int = 1
    stem: str = ""           # '' (7x7 conv) | 'deep' (three 3x3 convs, the 'd' variants)
    avg_down: bool = False   # avg-pool before the shortcut's 1x1 conv (the 'd' variants)
    zero_init_last: bool = False  # zero the last BN of each block (timm's default; the authors' code does not)
    drop_rate: float = 0.0   # dropout before the classifier


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
    milestones: List[int] = field(default_factory=lambda: [30, 60, 90])  # step only
    gamma: float = 0.1                                                   # step only
    min_lr: float = 0.0  # cosine only: final lr, absolute (not scaled with the batch)
    # Linear warm-up from ~0 to the scheduled lr over this many epochs (fractions allowed), per step; 0 = none.
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    amp: Amp = Amp.off
    channels_last: bool = False
    compile: bool = False    # torch.compile the model (after the DDP wrap)
    sync_bn: bool = False    # SyncBatchNorm across ranks; CUDA only (an error on CPU)
    # Exponential moving average of the weights, evaluated alongside them every epoch; 0 = off (e.g. 0.9998).
    ema_decay: float = 0.0
    grad_clip: float = 0.0   # max global L2 norm of the gradients; 0 = off
    log_interval: int = 50   # steps between 'train' records / console lines
    save_every_epochs: int = 1  # write checkpoints/last.pth after every N-th epoch (and always after the last)
    save_every_steps: int = 0   # also write last.pth every N global steps, mid-epoch; 0 = off
    keep_last: int = 3       # bounded history: checkpoints/epoch_XXXX.pth of the last N saved epochs; 0 = none
    max_steps: int = 0       # stop after this many global steps (smoke runs); 0 = no cap
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
    """Register the schemas and resolvers (idempotent). Schemas: train_schema, model_schema, data_schema."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="model_schema", node=ModelConfig)
    store.store(name="data_schema", node=DataConfig)
    if not OmegaConf.has_resolver("res2net.now"):
        OmegaConf.register_new_resolver("res2net.now", _now)
    if not OmegaConf.has_resolver("res2net.rank_zero_or"):
        OmegaConf.register_new_resolver("res2net.rank_zero_or", _rank_zero_or)


register_configs()
