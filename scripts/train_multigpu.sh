#!/usr/bin/env bash
# Train on every GPU of this machine: one torchrun (DDP, NCCL) with one process per GPU.
#
#   scripts/train_multigpu.sh model=res2net50_26w_8s data.root=/data/imagenet
#   NPROC=2 scripts/train_multigpu.sh ...        # only 2 processes (on a machine without GPUs: 2 CPU ranks, gloo)
#   DRY_RUN=1 scripts/train_multigpu.sh ...      # print the command instead of running it
#
# Every argument is a Hydra override passed to train.py unchanged. data.batch_size is per process, and optim.lr is
# stated per global batch of 256 and scaled by train.py, so the same overrides work for any NPROC.
# Environment: NPROC (processes, default: all visible GPUs), PYTHON (default: the repo's .venv), DRY_RUN.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
if [[ ! -x $python ]]; then
    echo "train_multigpu.sh: no Python at '$python'; run 'make install' in $repo or set PYTHON=/path/to/python" >&2
    exit 2
fi

nproc=${NPROC:-}
if [[ -z $nproc ]]; then
    nproc=$("$python" -c 'import torch; print(torch.cuda.device_count())')
    if [[ $nproc -eq 0 ]]; then
        echo "train_multigpu.sh: torch sees no CUDA GPU; set NPROC=<n> to start n CPU processes (gloo) instead" >&2
        exit 2
    fi
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "train_multigpu.sh: NPROC must be a positive integer, got '$nproc'" >&2
    exit 2
fi

cmd=("$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc" "$repo/train.py" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
