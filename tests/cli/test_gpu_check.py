"""scripts/gpu_check.sh's dry run (DRY_RUN=1): every command it would run on a GPU machine, checked here on the CPU:
the steps and their order, the skip lines without DALI or with one GPU, and that each command's arguments are valid
(train.py's overrides compose, benchmark.py parses its flags, pytest collects the CUDA tests). Also the benchmark's
timm peer row, which the check reports."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def dry_run(**env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k != "OUT"}
    full.update(DRY_RUN="1", PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if not line.startswith("#")]


def _step_limits(lines: list[str]) -> dict[str, int]:
    """{step name: its time limit in seconds} from the dry run's '# step NAME: at most N s' lines."""
    steps = [line[len("# step ") :].rsplit(": at most ", 1) for line in lines if line.startswith("# step ")]
    return {name: int(limit.split()[0]) for name, limit in steps}


def test_dry_run_lists_every_step_in_order_with_dali_and_several_gpus():
    lines = dry_run(NGPU="4", DALI="1", WORK="/tmp/w", REPORT="/tmp/r")
    cmds = commands(lines)
    assert not [line for line in lines if line.startswith("# skip")]
    py = sys.executable
    assert cmds[0][:3] == [py, "-m", "pytest"] and "-m" in cmds[0][3:] and "cuda" in cmds[0]
    assert "tests/engine/test_cuda.py" in cmds[0] and "not test_mixed_decoding_matches_cpu_path" in cmds[0]
    bench = [c for c in cmds if c[1:2] == ["scripts/benchmark.py"]]
    assert [c[c.index("--model") + 1] for c in bench] == ["res2net50_26w_4s", "res2net50_26w_8s"]
    for c in bench:
        for flag in ("--compile", "--peer", "--batch-size", "--json"):
            assert flag in c
        assert c[c.index("--device") + 1] == "cuda" and c[c.index("--batch-size") + 1] == "256"
        assert c[c.index("--json") + 1].startswith("/tmp/r/bench_")
    train = [c for c in cmds if "train.py" in c]
    assert len(train) == 6  # 1 GPU and torchrun 4 GPUs for torchvision and dali, then the rsb_a3 and tv_recipe presets
    for c in train:
        assert c[:2] == ["env", "RES2NET_SYNC_DEBUG=1"] and "trainer.device=cuda" in c
    plain, presets = train[:4], train[4:]
    torchrun = [c for c in plain if "torch.distributed.run" in c]
    assert [c[c.index("--standalone") + 1] for c in torchrun] == ["--nproc-per-node=4"] * 2
    assert all("trainer.sync_bn=true" in c for c in torchrun)
    assert sorted(next(a for a in c if a.startswith("data.backend=")) for c in plain) == [
        "data.backend=dali",
        "data.backend=dali",
        "data.backend=torchvision",
        "data.backend=torchvision",
    ]
    # the presets users start first, compiled, on DALI's GPU path, across an epoch boundary
    assert [next(a for a in c if a.startswith("experiment=")) for c in presets] == [
        "experiment=rsb_a3",
        "experiment=tv_recipe",
    ]
    for c in presets:
        assert {"trainer.compile=true", "data.backend=dali", "schedule.epochs=2"} <= set(c)
    parity = next(i for i, c in enumerate(cmds) if "test_mixed_decoding_matches_cpu_path" in c and "-k" in c[-2:])
    first_bench = cmds.index(bench[0])
    assert cmds.index(train[-1]) < parity < first_bench  # smoke runs and parity before the benchmarks
    assert first_bench == len(cmds) - len(bench)
    limits = _step_limits(lines)
    compiled = [limits[name] for name in limits if name.startswith("train.py experiment=")]
    assert len(compiled) == 2 and min(compiled) > limits["train.py 1 GPU, dali"]  # room for compilation


def test_dry_run_without_dali_and_with_one_gpu_says_what_it_skips():
    lines = dry_run(NGPU="1", DALI="0")
    skips = [line for line in lines if line.startswith("# skip")]
    assert len(skips) == 3
    assert any("data.backend=dali" in s and "nvidia-dali-cuda130" in s for s in skips)
    assert any("torchrun all GPUs, torchvision" in s and "one GPU" in s for s in skips)
    assert any("DALI mixed val parity" in s for s in skips)
    train = [c for c in commands(lines) if "train.py" in c]
    assert len(train) == 3 and all("data.backend=torchvision" in c for c in train)  # the presets fall back too
    assert not any("torch.distributed.run" in c for c in train)
    assert all("gpu_report/bench_" in c[-1] for c in commands(lines) if "scripts/benchmark.py" in c)  # default


def test_dry_run_report_folder_is_out_when_set():
    lines = dry_run(NGPU="1", DALI="0", OUT="/tmp/device_out")
    bench = [c for c in commands(lines) if "scripts/benchmark.py" in c]
    assert bench and all(c[-1].startswith("/tmp/device_out/bench_") for c in bench)


def test_dry_run_commands_are_valid_here():
    """train.py's overrides compose (--cfg job runs nothing), benchmark.py parses its flags, and the CUDA test run
    collects tests (all skipped on this machine)."""
    cmds = commands(dry_run(NGPU="2", DALI="1", WORK="/tmp/w"))
    single = next(c for c in cmds if "train.py" in c and "torch.distributed.run" not in c)
    multi = next(c for c in cmds if "torch.distributed.run" in c)
    presets = [c for c in cmds if any(a.startswith("experiment=") for a in c)]
    jobs = []
    for c in (single, multi[multi.index("train.py") :], *presets):
        args = c[c.index("train.py") + 1 :]
        proc = subprocess.run(
            [sys.executable, "train.py", *args, "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert "device: cuda" in proc.stdout and "root: /tmp/w/jpegs" in proc.stdout
        jobs.append(proc.stdout)
    for job, knob in zip(jobs[2:], ("auto_augment: rand-m6-mstd0.5-inc1", "ema_decay: 0.999966"), strict=True):
        assert knob in job and "compile: true" in job and "max_steps: 6" in job  # the preset's own recipe, shrunk

    from scripts import benchmark

    bench = next(c for c in cmds if "scripts/benchmark.py" in c)
    args = benchmark.parse_args(bench[2:])
    assert args.peer == "timm" and args.compile and args.batch_size == 256 and args.precision == "bf16"

    collect = cmds[0] + ["--collect-only"]
    proc = subprocess.run(collect[:1] + collect[1:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_cuda.py" in proc.stdout and "test_steady_state_step_never_waits_for_the_device" in proc.stdout


def test_refuses_to_run_without_a_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    env = {**os.environ, "PYTHON": sys.executable, "REPORT": str(tmp_path / "r"), "WORK": str(tmp_path / "w")}
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "torch sees no CUDA GPU" in proc.stderr


def test_benchmark_peer_row_is_timm_with_the_same_weights(tmp_path):
    out = tmp_path / "bench.json"
    tiny = "--base-width 4 --scale 2 --layers 1 1 1 1 --num-classes 10 --img-size 32 --batch-size 2 --warmup 1"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", *tiny.split(), "--iters", "1", "--rounds", "1", "--threads", "1"]
        + ["--precision", "fp32", "--peer", "timm", "--json", str(out), "--keep-allocator"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [(r["mode"], r["path"]) for r in json.loads(out.read_text())["rows"]]
    assert ("inference", "timm eager fp32 NCHW") in rows and ("train", "timm eager fp32 NCHW") in rows
