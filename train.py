"""Train a Res2Net on ImageNet (or any ImageFolder) with the paper's recipe; every knob is a Hydra override.

    python train.py model=res2net50_26w_8s data.root=/data/imagenet
    torchrun --standalone --nproc_per_node=4 train.py model=res2net50_26w_8s data.root=/data/imagenet
    python train.py --cfg job model=res2net50_26w_8s          # show the composed config, run nothing
    python train.py hydra.run.dir=<run dir> resume=auto       # continue a run where it stopped

Exit codes: 0 finished (or stopped at trainer.max_steps), 75 stopped by SIGTERM / SIGUSR1 after writing
checkpoints/last.pth at the exact position (run the same command with resume=auto to continue), 2 a config or usage
error, 1 a failure at run time (res2net/errors.py; a user error prints one `error: ...` line, HYDRA_FULL_ERROR=1 adds
its traceback). One train.py at a time per run directory: a second one exits 1 naming the first's pid and host.
Repeated SIGTERM / SIGUSR1 while that checkpoint is pending are ignored (SLURM and torchrun both deliver one), and one
during start-up stops the run after its first step; to end a run at once without a checkpoint, send SIGINT (Ctrl-C)
or SIGKILL.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from res2net.config import RUN_TIME_ENV, register_configs
from res2net.engine import distributed
from res2net.engine.stop import PREEMPTED_EXIT_CODE, StopRequest
from res2net.engine.train_job import train
from res2net.errors import hydra_entry, run_hydra_main

log = logging.getLogger("train")
register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@hydra_entry
def main(cfg: DictConfig) -> None:
    # Rank and device are read here, in the process that trains: Hydra's submitit launcher pickles this function with
    # its globals and runs it on another machine, so nothing machine-specific may be computed at import.
    with (
        distributed.process_group(cfg.trainer.device) as info,
        StopRequest() as stop,
    ):  # stop: open until the process exits
        if not info.is_main:  # one console: rank 0 reports progress, the others only warnings and errors
            logging.getLogger().setLevel(logging.WARNING)
        run_dir = HydraConfig.get().runtime.output_dir
        result = train(cfg, run_dir, info, stop=stop)
        log.info(
            "%s after %d epochs (global step %d); best val top-1 %s; run directory %s",
            result.status,
            result.epoch,
            result.global_step,
            "n/a" if result.best_top1 is None else f"{result.best_top1:.2f}",
            run_dir,
        )
        if result.status == "preempted":
            if info.is_main:  # the other ranks stay quiet: one message says where the checkpoint is
                log.warning(
                    "preempted: wrote %s; continue with the same command plus hydra.run.dir=%s resume=auto",
                    result.checkpoint,
                    run_dir,
                )
            sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    # torchrun's ranks join the process group before Hydra composes the config, so rank 0 can hand every rank the
    # launch time that names the run directory (Hydra's own ${now:} would differ between ranks). The task function
    # joins the same group again (a no-op here; a fresh one in a submitit job).
    with distributed.process_group():
        distributed.share_run_time(RUN_TIME_ENV)
        run_hydra_main(main)
