"""Train a Res2Net on ImageNet (or any ImageFolder) with the paper's recipe; every knob is a Hydra override.

    python train.py model=res2net50_26w_8s data.root=/data/imagenet
    torchrun --standalone --nproc_per_node=4 train.py model=res2net50_26w_8s data.root=/data/imagenet
    python train.py --cfg job model=res2net50_26w_8s          # show the composed config, run nothing
    python train.py hydra.run.dir=<run dir> resume=auto       # continue a run where it stopped, as it was configured

Exit codes: 0 finished (or stopped at trainer.max_steps), 75 stopped by SIGTERM / SIGUSR1 after writing
checkpoints/last.pth at the exact position, 130 stopped by Ctrl-C (SIGINT) after writing it (a second Ctrl-C stops at
once, without it); continue either with `python train.py hydra.run.dir=<run dir> resume=auto`. 2 a config or usage
error, 1 a failure at run time (res2net/errors.py; a user error prints one `error: ...` line, HYDRA_FULL_ERROR=1 adds
its traceback). One train.py at a time per run directory: a second one exits 1 naming the first's pid and host.
Repeated SIGTERM / SIGUSR1 while that checkpoint is pending are ignored (SLURM and torchrun both deliver one), and one
during start-up (the handlers are installed first of all) stops the run after its first step.
"""

from res2net.engine import stop

if __name__ == "__main__":  # first of all, before the slow imports and composition: an early signal is a stop request
    stop.install()

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from res2net.config import TrainConfig, check_known_keys, recorded_run_config, register_configs  # noqa: E402
from res2net.errors import hydra_entry  # noqa: E402
from res2net.launch import run_entry_point  # noqa: E402

log = logging.getLogger("train")
register_configs()
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@hydra_entry
def main(cfg: DictConfig) -> None:
    # torch loads here, not at import: `--help` and `--cfg job` answer in a second.
    from res2net.engine import distributed
    from res2net.engine.train_job import train

    request = stop.install()  # open until the process exits (a no-op here; a fresh one in a submitit job)
    check_known_keys(cfg, TrainConfig)
    run_dir = HydraConfig.get().runtime.output_dir
    cfg = recorded_run_config(cfg, run_dir, list(HydraConfig.get().overrides.task))
    # Rank and device are read here, in the process that trains: Hydra's submitit launcher pickles this function with
    # its globals and runs it on another machine, so nothing machine-specific may be computed at import.
    with distributed.process_group(cfg.trainer.device) as info:
        if not info.is_main:  # one console: rank 0 reports progress, the others only warnings and errors
            logging.getLogger().setLevel(logging.WARNING)
        result = train(cfg, run_dir, info, stop=request)
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
                    "%s: wrote %s; continue with: python train.py hydra.run.dir=%s resume=auto%s",
                    "interrupted (Ctrl-C)" if request.interrupted else "preempted",
                    result.checkpoint,
                    run_dir,
                    " (under torchrun: the same launcher with these two arguments)" if info.world_size > 1 else "",
                )
            sys.exit(stop.exit_code_for(request))


if __name__ == "__main__":
    run_entry_point(main, CONFIG_DIR)
