"""Train a Res2Net on ImageNet (or any ImageFolder) with the paper's recipe; every knob is a Hydra override.

    python train.py model=res2net50_26w_8s data.root=/data/imagenet
    torchrun --standalone --nproc_per_node=4 train.py model=res2net50_26w_8s data.root=/data/imagenet
    python train.py --cfg job model=res2net50_26w_8s          # show the composed config, run nothing
    python train.py hydra.run.dir=<run dir> resume=auto       # continue a run where it stopped

Exit codes: 0 finished (or stopped at trainer.max_steps), 75 stopped by SIGTERM / SIGUSR1 after writing
checkpoints/last.pth at the exact position (run the same command with resume=auto to continue), 1 an error.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from res2net.config import RUN_TIME_ENV, register_configs
from res2net.engine import distributed
from res2net.engine.trainer import PREEMPTED_EXIT_CODE, train

log = logging.getLogger("train")
register_configs()
DIST = distributed.DistInfo()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    if not DIST.is_main:  # one console: rank 0 reports progress, the others only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = HydraConfig.get().runtime.output_dir
    result = train(cfg, run_dir, DIST)
    log.info("%s after %d epochs (global step %d); best val top-1 %s; run directory %s", result.status,
             result.epoch, result.global_step, "n/a" if result.best_top1 is None else f"{result.best_top1:.2f}",
             run_dir)
    if result.status == "preempted":
        if DIST.is_main:
            log.warning("preempted: wrote %s; continue with the same command plus hydra.run.dir=%s resume=auto",
                        result.checkpoint, run_dir)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    # The process group exists before Hydra composes the config, so rank 0 can hand every rank the launch time
    # that names the run directory (Hydra's own ${now:} would differ between ranks).
    DIST = distributed.init_distributed()
    try:
        distributed.share_run_time(RUN_TIME_ENV)
        main()
    finally:
        distributed.cleanup()
