#!/usr/bin/env bash
# Check the whole GPU path of this checkout on one machine, inside 9.5 minutes on one H100 / H200, and write a report.
#
#   scripts/gpu_check.sh                # report in $OUT if set, else gpu_report/
#   REPORT=/tmp/report scripts/gpu_check.sh
#   DRY_RUN=1 scripts/gpu_check.sh      # print every command, run nothing
#
# Steps, what users run first first (the benchmarks come last, so a tight BUDGET cuts them, not the checks): the CUDA
# tests (pytest -m cuda); train.py smoke runs (1 process; all GPUs with torchrun when there are several) on a small
# JPEG folder with the torchvision backend, and with DALI when it imports; smoke runs of the rsb_a3 and tv_recipe
# presets (a few steps over two epochs, torch.compile on, DALI's GPU path when it imports: RandAugment / TrivialAugment,
# mixup / cutmix, BCE, LAMB, EMA, accumulation); all smoke runs with torch's sync debug mode on after each epoch's first
# step and off for validation (RES2NET_SYNC_DEBUG=1: every distinct host-sync site is listed in the report); the DALI
# 'mixed' val parity test; scripts/benchmark.py --device cuda (train and inference img/s at batch 256: eager fp32,
# the defaults bf16 + channels_last, + compile, and timm's eager model with the same weights) for each model.
# A failing step is reported and the next one runs; the exit code is 1 when any step failed.
#
# Needs torch with CUDA, torchvision, timm, Pillow, numpy, pytest, tensorboard, Hydra and omegaconf. Where Hydra is
# missing, wheels in WHEELS (default shared/wheels) are installed into a temporary folder first; fetch them where pip
# can reach PyPI (antlr4's runtime is a source release, which pip wheel builds):
#   pip wheel --no-deps -w shared/wheels hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# Environment: PYTHON (default: the repo's .venv if it exists, else python), REPORT, WORK (run directories and data,
# default /tmp/res2net_gpu_check), WHEELS, MODELS (benchmark models), BENCH_ARGS, NGPU (GPUs for the all-GPU run,
# default: all visible), DALI (auto | 0 | 1: run the DALI steps; auto: when nvidia.dali imports), STEP_TIMEOUT
# (seconds per step at most, 150), COMPILE_TIMEOUT (seconds per compiled preset smoke run, whose first train and val
# steps compile: 240), BUDGET (seconds for all steps, 560: later steps are cut short), DRY_RUN.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python
fi
report=${REPORT:-${OUT:-gpu_report}}
work=${WORK:-/tmp/res2net_gpu_check}
wheels=${WHEELS:-shared/wheels}
models=${MODELS:-res2net50_26w_4s res2net50_26w_8s}
bench_args=${BENCH_ARGS:---batch-size 256 --warmup 2 --iters 5 --rounds 2}
step_timeout=${STEP_TIMEOUT:-150}
compile_timeout=${COMPILE_TIMEOUT:-240}
budget=${BUDGET:-560}
dry=${DRY_RUN:-0}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0

run() {  # run NAME LOG COMMAND...: one step of at most STEP_TIMEOUT seconds
    run_within "$step_timeout" "$@"
}

run_within() {  # run_within SECONDS NAME LOG COMMAND...: one step, timed, its output appended to LOG, a summary row
    local most=$1 name=$2 log=$3
    shift 3
    if [[ $dry == 1 ]]; then
        echo "# step $name: at most $most s"
        printf '%q ' "$@"
        echo
        return 0
    fi
    local start=$SECONDS status=pass limit=$((budget - SECONDS))
    ((limit > most)) && limit=$most
    if ((limit < 10)); then
        skip "$name" "out of time (BUDGET=$budget s)"
        failed=1
        return 0
    fi
    echo "== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    case $? in
        0) ;;
        124 | 137) status="timeout ($limit s)" failed=1 ;;
        *) status=fail failed=1 ;;
    esac
    echo "| $name | $status | $((SECONDS - start)) | $(basename "$log") |" >>"$report/summary.md"
    echo "gpu_check: $name: $status"
}

skip() {  # skip NAME REASON: a step that cannot run here, said so in the report
    if [[ $dry == 1 ]]; then
        echo "# skip $1: $2"
    else
        echo "| $1 | skipped: $2 | 0 | |" >>"$report/summary.md"
        echo "gpu_check: $1: skipped: $2"
    fi
}

probe() {  # probe PYTHON-EXPRESSION: its printed value, or empty when it fails
    "$python" -c "$1" 2>/dev/null || true
}

if [[ $dry != 1 ]]; then
    mkdir -p "$report" "$work"
    {
        echo "# GPU check of $(git rev-parse --short HEAD 2>/dev/null || echo 'this checkout'), $(date -u +%FT%TZ)"
        echo
        echo "| step | status | seconds | log |"
        echo "|---|---|---:|---|"
    } >"$report/summary.md"
fi

if [[ -z $(probe 'import hydra, omegaconf; print(1)') ]]; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        run "install Hydra from $wheels" "$report/setup.log" \
            "$python" -m pip install -q --no-index --no-deps --target "$work/site" "$wheels"/*.whl
        export PYTHONPATH=$PYTHONPATH:$work/site
    else
        echo "gpu_check: Hydra is not importable and $wheels holds no wheels; see the comment at the top" >&2
        [[ $dry == 1 ]] || exit 2
    fi
fi

ngpu=${NGPU:-$(probe 'import torch; print(torch.cuda.device_count())')}
ngpu=${ngpu:-0}
if [[ $dry != 1 && $ngpu -lt 1 ]]; then
    why="torch sees no CUDA GPU: $(probe 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
    echo "| torch sees a GPU | fail: $why | 0 | |" >>"$report/summary.md"
    echo "gpu_check: $why" >&2
    exit 2
fi
dali=${DALI:-auto}
if [[ $dali == auto ]]; then
    dali=$([[ -n $(probe 'import nvidia.dali; print(1)') ]] && echo 1 || echo 0)
fi
if [[ $dry != 1 ]]; then
    probe 'import torch, platform; print("torch", torch.__version__, "CUDA", torch.version.cuda, "Python",
platform.python_version()); [print(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]' \
        >"$report/env.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$report/env.txt" 2>&1 || true
    echo "DALI: $(probe 'import nvidia.dali; print(nvidia.dali.__version__)')" >>"$report/env.txt"
fi

# 1. The CUDA tests; the DALI 'mixed' parity test has a row of its own (step 4).
mapfile -t cuda_tests < <(grep -rl --include='test_*.py' 'mark\.cuda' tests)
run "pytest -m cuda" "$report/pytest.log" "$python" -m pytest -q -rs -p no:cacheprovider -m cuda \
    -k 'not test_mixed_decoding_matches_cpu_path' "${cuda_tests[@]}"

# 2. train.py smoke runs on a small JPEG folder, host syncs reported after the first step.
data=$work/jpegs
run "make a JPEG folder" "$report/smoke.log" "$python" -c "import sys; sys.path.insert(0, 'tests'); \
from pathlib import Path; from test_data_helpers import write_noise_split as w; \
w(Path('$data'), 'train', 512, seed=0); w(Path('$data'), 'val', 200, seed=1)"
backends=(torchvision)
if [[ $dali == 1 ]]; then
    backends+=(dali)
else
    skip "train.py data.backend=dali" "NVIDIA DALI does not import here (pip install nvidia-dali-cuda130)"
fi
smoke=(trainer.device=cuda data.root="$data" data.img_size=64 data.batch_size=32 data.num_workers=4
    schedule.epochs=2 trainer.log_interval=4)
for backend in "${backends[@]}"; do
    run "train.py 1 GPU, $backend" "$report/smoke.log" env RES2NET_SYNC_DEBUG=1 "$python" train.py \
        "${smoke[@]}" data.backend="$backend" hydra.run.dir="$work/runs/1gpu-$backend"
    if [[ $ngpu -gt 1 ]]; then
        run "torchrun $ngpu GPUs, $backend" "$report/smoke.log" env RES2NET_SYNC_DEBUG=1 "$python" \
            -m torch.distributed.run --standalone --nproc-per-node="$ngpu" train.py "${smoke[@]}" \
            trainer.sync_bn=true data.backend="$backend" hydra.run.dir="$work/runs/${ngpu}gpu-$backend"
    else
        skip "torchrun all GPUs, $backend" "one GPU here"
    fi
done

# 3. The modern presets as a user starts them, shrunk to a few steps over two epochs (validation, then the sync
# debug mode re-armed for the second epoch), compiled: a 4-layer Res2Net-50 keeps compilation within
# COMPILE_TIMEOUT; the train and val sizes differ (160 / 224, 176 / 224) and compile with static shapes.
preset_backend=torchvision
[[ $dali == 1 ]] && preset_backend=dali
for preset in rsb_a3 tv_recipe; do
    run_within "$compile_timeout" "train.py experiment=$preset, compiled, $preset_backend" "$report/smoke.log" \
        env RES2NET_SYNC_DEBUG=1 "$python" train.py experiment="$preset" trainer.device=cuda trainer.compile=true \
        data.root="$data" data.backend="$preset_backend" data.batch_size=64 data.num_workers=4 "model.layers=[1,1,1,1]" \
        schedule.epochs=2 trainer.max_steps=6 trainer.log_interval=1 hydra.run.dir="$work/runs/$preset"
done

# 4. DALI 'mixed' (nvJPEG) validation batches against the CPU decoder.
if [[ $dali == 1 ]]; then
    run "DALI mixed val parity" "$report/pytest.log" "$python" -m pytest -q -rs -p no:cacheprovider \
        tests/data/test_data_dali.py -k test_mixed_decoding_matches_cpu_path
else
    skip "DALI mixed val parity" "NVIDIA DALI does not import here"
fi

# 5. Throughput: eager fp32 vs the defaults (bf16 + channels_last) vs + compile, and timm's eager model.
for model in $models; do
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    run "benchmark $model" "$report/bench.log" "$python" scripts/benchmark.py --device cuda --model "$model" \
        --precision bf16 --compile --peer timm $bench_args --json "$report/bench_$model.json"
done

if [[ $dry != 1 ]]; then
    {
        echo
        echo "## Throughput (img/s; speed-up over eager fp32 NCHW)"
        for model in $models; do
            echo
            echo "$model:"
            probe "import json, sys; sys.path.insert(0, 'scripts'); import benchmark as b
print(b.markdown_table([b.Row(**r) for r in json.load(open('$report/bench_$model.json'))['rows']]))"
        done
        echo
        echo "## Host-sync sites in training steps after each epoch's first (RES2NET_SYNC_DEBUG=1; each site once)"
        echo
        grep -E '\.py:[0-9]+: UserWarning: called a synchronizing CUDA operation' "$report/smoke.log" |
            sed 's/: UserWarning.*//' | sort | uniq -c || echo "none"
    } >>"$report/summary.md"
    echo "gpu_check: report in $report/summary.md"
fi
exit $failed
