"""Process-group set-up from torchrun's environment, and the few collectives the trainer needs.

One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) runs without a process group; under torchrun every rank joins one
with NCCL on CUDA and gloo on CPU. Multi-node jobs use torchrun's rendezvous (``--rdzv-backend=c10d``); nothing here
is node-specific. A rank that dies takes the job down through torchrun, which stops the others; the timeout below
bounds how long a collective may wait on a peer that hangs instead of dying.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEVICES",
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_distributed",
    "process_group",
    "select_device",
    "share_run_time",
    "unwrap_model",
    "wrap_model",
]

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun") from None


DEVICES = ("auto", "cuda", "cpu")


def _cuda_driver_hint() -> str:
    """What torch's CUDA build needs from the driver, and what torch sees, for the 'no usable GPU' error."""
    build = torch.version.cuda
    if build is None:
        return (
            "this torch is a CPU-only build; install a CUDA build of torch (README: Install on a GPU machine) "
            "or use device=cpu"
        )
    driver = ">= 580" if build.startswith("13") else ">= 525" if build.startswith("12") else "matching its CUDA version"
    return (
        f"torch {torch.__version__} is built for CUDA {build} (needs an NVIDIA driver {driver}) and sees "
        f"{torch.cuda.device_count()} GPU(s); check nvidia-smi, CUDA_VISIBLE_DEVICES, or install the torch build "
        f"for your driver (README: Install on a GPU machine); device=cpu runs on the CPU"
    )


def select_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device for ``spec`` (auto | cuda | cpu, or cuda:N): auto takes this rank's GPU when torch sees one.

    ``cuda`` without a usable GPU is an error naming torch's CUDA build, the driver it needs and the GPUs it sees;
    ``auto`` without a GPU in a multi-process job warns once (it would train on CPU processes).
    """
    kind = spec.split(":", 1)[0]
    if kind not in DEVICES:
        raise ValueError(f"device={spec!r} is not one of {DEVICES} (or cuda:<index>)")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        if kind == "auto" and world_size > 1 and local_rank == 0:
            warnings.warn(
                f"device=auto found no usable GPU, so these {world_size} processes train on the CPU with "
                f"gloo. If this machine has GPUs: {_cuda_driver_hint()}; set trainer.device=cuda to make "
                f"this an error",
                stacklevel=2,
            )
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={spec} but torch cannot use a GPU here: {_cuda_driver_hint()}")
    index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"this process needs cuda:{index} (LOCAL_RANK={local_rank}) but only "
            f"{torch.cuda.device_count()} CUDA devices are visible; start at most that many processes "
            f"per node (--nproc_per_node)"
        )
    return torch.device("cuda", index)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone. Idempotent.

    The group's backend follows the device: NCCL on CUDA, gloo on the CPU. A group that already exists (train.py's
    launcher block creates one with ``auto``) must fit the device asked for.
    """
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    chosen = select_device(device, local_rank, world_size)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1:
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        elif dist.get_backend() != backend:
            raise RuntimeError(
                f"device={device} needs a {backend} process group, but this job's group uses "
                f"{dist.get_backend()}; to run on the CPU of a GPU machine hide the GPUs "
                f"(CUDA_VISIBLE_DEVICES=) instead of setting device=cpu"
            )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """``init_distributed(device)`` for the enclosed code; on leaving, destroys the process group only if this call
    created it, so nested uses (train.py's launcher block around its task function) share one group.

    Call it where the work runs, never at import: Hydra's submitit launcher pickles the task function with its
    globals, and a ``DistInfo`` made on the submitting machine would carry that machine's device into every job.
    """
    created = not _initialized()
    info = init_distributed(device)
    try:
        yield info
        if created:
            # Ranks leave together: a rank that tore its gloo pairs down while a peer still worked (rank 0 writing
            # its last files) was seen to abort ("terminate called without an active exception").
            barrier()
    finally:
        if created:
            cleanup()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (unchanged without a process group)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op without a process group); returns the tensor."""
    if _initialized():
        dist.all_reduce(tensor)
    return tensor


def share_run_time(env: str) -> float:
    """Rank 0's launch time on every rank, stored in ``os.environ[env]`` (rank 0's existing value wins, e.g. one a
    launcher set). Hydra computes the run directory from it before the task runs, so all ranks use the same one.
    """
    os.environ[env] = broadcast_object(os.environ.get(env) or repr(time.time()))
    return float(os.environ[env])


def wrap_model(model: nn.Module, info: DistInfo, compile: bool = False) -> nn.Module:
    """DDP around ``model`` when there are several processes, then torch.compile when asked."""
    if info.world_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        # Static shapes: each train size (progressive resizing) and the val size get their own graph, a few
        # recompiles, instead of dynamic-shape kernels for the whole run after the second size is seen.
        model = torch.compile(model, dynamic=False)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
