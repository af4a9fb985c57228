"""GPU readiness checked on the CPU: device refusal, what ``auto`` resolves to here, and the one-step-late agreement
of the sync-free training step (a stop or a non-finite loss seen at step k acts after step k+1, on every rank)."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from res2net.engine.amp import resolve_amp, resolve_channels_last
from res2net.engine.distributed import DistInfo, select_device
from res2net.engine.losses import CrossEntropy
from res2net.engine.metrics import MetricsWriter, TrainProgress
from res2net.engine.stop import StopRequest
from res2net.engine.train_loop import Limits, NonFiniteLossError, Outcome, Run, TrainState, train_one_epoch

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a usable GPU")


@needs_no_gpu
def test_device_cuda_without_a_gpu_names_the_build_and_what_torch_sees():
    with pytest.raises(RuntimeError, match=r"device=cuda but torch cannot use a GPU here: .*sees 0 GPU\(s\)|CPU-only"):
        select_device("cuda")
    with pytest.raises(ValueError, match="device='tpu' is not one of"):
        select_device("tpu")


@needs_no_gpu
def test_auto_without_a_gpu_warns_once_in_a_multi_process_job_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_device("auto", local_rank=0, world_size=1) == CPU
        assert select_device("auto", local_rank=1, world_size=4) == CPU  # one warning per node, from local rank 0
    assert not caught
    with pytest.warns(UserWarning, match="found no usable GPU, so these 4 processes train on the CPU"):
        assert select_device("auto", local_rank=0, world_size=4) == CPU


def test_auto_means_fp32_nchw_for_training_on_the_cpu():
    assert resolve_amp("auto", CPU) == "off"
    assert resolve_channels_last("auto", CPU) is False
    assert resolve_channels_last("auto", CPU, inference=True) is True  # folded convs run faster in channels_last
    assert resolve_amp("bf16", CPU) == "bf16" and resolve_channels_last("True", CPU) is True
    with pytest.raises(ValueError, match="trainer.amp='fp8'"):
        resolve_amp("fp8", CPU, "trainer.amp")


@needs_no_gpu
def test_train_py_refuses_device_cuda_and_records_what_auto_became(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=debug",
        "data.synthetic_train_size=16",
        "data.synthetic_val_size=8",
        "schedule.epochs=1",
    ]
    refused = subprocess.run(
        [*base, "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'a'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "device=cuda but torch cannot use a GPU here" in refused.stderr + refused.stdout
    assert not (tmp_path / "a" / "checkpoints").exists()
    ran = subprocess.run(
        [*base, f"hydra.run.dir={tmp_path / 'b'}"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    trainer = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["trainer"]
    assert (trainer["device"], trainer["amp"], trainer["channels_last"]) == ("cpu", "off", False)


class _Batches:
    """A loader of fixed batches; ``on_batch(i)`` runs as batch i is handed out (while step i-1 has finished)."""

    def __init__(self, n: int, on_batch=lambda i: None, poison_at: int | None = None):
        self.n, self.on_batch, self.poison_at = n, on_batch, poison_at
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 4, 3, 8, 8, generator=gen)
        self.labels = torch.randint(0, 3, (n, 4), generator=gen)
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.start, self.n):
            self.on_batch(i)
            images = self.images[i]
            if i == self.poison_at:
                images = torch.full_like(images, math.inf)
            yield images, self.labels[i]


def _run(loader, stop, tmp_path, save_every_steps=0, saves=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState()
    progress = TrainProgress(
        MetricsWriter(tmp_path, False), CPU, epochs=1, steps_per_epoch=len(loader), log_interval=100, world_size=1
    )
    saves = saves if saves is not None else []
    run = Run(
        model=model,
        net=model,
        optimizer=optimizer,
        scaler=scaler,
        criterion=CrossEntropy(),
        train_loader=loader,
        val_loader=None,
        state=state,
        lr_at=lambda step: 0.1,
        dist=DistInfo(),
        progress=progress,
        limits=Limits(epochs=1, save_every_steps=save_every_steps),
        save=lambda: saves.append(state.global_step),
        global_batch=4,
    )
    outcome = train_one_epoch(run, stop)
    return outcome, state


def test_a_stop_seen_during_step_k_ends_the_epoch_after_step_k_plus_1(tmp_path):
    stop = StopRequest()

    def signal_during_step(i):  # batch 3 is handed out after step 3 finished: the flag rides on step 4 (k = 4)
        if i == 3:
            stop.signum = 15

    outcome, state = _run(_Batches(10, signal_during_step), stop, tmp_path)
    assert outcome is Outcome.PREEMPTED
    assert (state.step_in_epoch, state.global_step, state.meters["steps"]) == (5, 5, 5)  # k + 1, every loss counted


def test_a_non_finite_loss_at_step_k_raises_after_step_k_plus_1_and_before_any_save_of_it(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \((nan|inf)\) at global step 3"):
        _run(_Batches(10, poison_at=2), StopRequest(), tmp_path)
    saves: list[int] = []  # a save due at the bad step reads the agreement first: nothing is written from it
    with pytest.raises(NonFiniteLossError, match="at global step 3"):
        _run(_Batches(10, poison_at=2), StopRequest(), tmp_path, save_every_steps=3, saves=saves)
    assert saves == []
    saves = []
    outcome, state = _run(_Batches(6), StopRequest(), tmp_path, save_every_steps=3, saves=saves)
    assert outcome is Outcome.FINISHED and saves == [3, 6] and state.meters["steps"] == 6
