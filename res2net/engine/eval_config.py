"""Typed schema of evaluate.py's config (``configs/eval.yaml``), registered in Hydra's ConfigStore as eval_schema.

It nests the same ``model`` and ``data`` groups as training (res2net.config.ModelConfig, res2net.data.DataConfig), so
`python evaluate.py model=res2net50_26w_8s data.root=...` composes the same files as train.py, and a misspelt key fails
at start-up with Hydra's message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from res2net.config import Amp, ModelConfig, register_configs
from res2net.data.config import DataConfig

__all__ = ["EvalConfig", "register_eval_config"]


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # 'released': the released file of model.name (downloaded and verified into the cache if missing);
    # otherwise the path of a released file or of any checkpoint train.py wrote.
    checkpoint: str = "released"
    use_ema: bool = False     # evaluate the EMA weights of a train.py checkpoint
    amp: Amp = Amp.off        # autocast dtype for the forward pass
    channels_last: bool = True
    compile: bool = False     # torch.compile the prepared model
    # Fold BatchNorm into the convs (res2net.prepare_for_inference); outputs unchanged within float tolerance.
    fold_bn: bool = True
    device: str = "auto"      # auto (the local GPU under torchrun, else the CPU) | cpu | cuda
    save_predictions: bool = False  # also write predictions.csv (path, target, top-5 indices and probabilities)
    progress: bool = True     # progress bar on rank 0


def register_eval_config() -> None:
    """Register eval_schema (and, through res2net.config, the training schemas and resolvers). Idempotent."""
    register_configs()
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register_eval_config()
