#!/usr/bin/env python
"""Evaluate a checkpoint on a validation set: top-1/top-5, loss, per-class accuracy, img/s -> results.json.

    python evaluate.py model=res2net50_26w_4s checkpoint=released data.root=/data/imagenet
    python evaluate.py checkpoint=outputs/<run>/checkpoints/best.pth data=folder data.root=<dir> save_predictions=true
    torchrun --standalone --nproc_per_node=2 evaluate.py data.root=/data/imagenet

One process or torchrun: each validation image is counted exactly once for any world size. data.backend=torchvision
is the reference path (PIL, antialiased bilinear: how the published numbers were measured), dali the fast one.
The output directory is Hydra's run directory (hydra.run.dir=<dir> to choose it). Options: configs/eval.yaml.
"""

import contextlib
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from res2net.config import check_eval_config, register_configs
from res2net.errors import hydra_entry
from res2net.launch import run_entry_point

log = logging.getLogger("evaluate")
register_configs()
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@hydra_entry
def main(cfg: DictConfig) -> None:
    # torch loads here, not at import: `--help` answers in a second.
    from res2net.data.preprocess import command_line_fields
    from res2net.engine import distributed
    from res2net.engine.eval_job import evaluate_checkpoint, summary_lines
    from res2net.engine.run_lock import output_dir_lock

    check_eval_config(cfg)
    out_dir = HydraConfig.get().runtime.output_dir
    with distributed.process_group() as info:  # read here, not at import (see train.py)
        # The checkpoint's own preprocessing, except the data.* fields typed on the command line.
        keep = command_line_fields(HydraConfig.get().overrides.task)
        with output_dir_lock(out_dir) if info.is_main else contextlib.nullcontext():  # one results.json writer
            result = evaluate_checkpoint(cfg, out_dir if info.is_main else None, info, keep_data=keep)
    if result is not None:
        for line in summary_lines(result):
            log.info(line)
        log.info("results: %s", os.path.join(out_dir, "results.json"))


if __name__ == "__main__":
    run_entry_point(main, CONFIG_DIR)
