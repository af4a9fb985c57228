"""A checkpoint's declared architecture is checked against its tensors before the model is built (issue 21,
item 5): evaluation, the distillation teacher and export refuse a file whose recorded config declares a huge model
next to small tensors, in one error naming the file, without allocating that model."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import res2net
from res2net.errors import CheckpointError
from res2net.models import resolve_model_config
from res2net.models.guard import check_declared_architecture

REPO = Path(__file__).resolve().parents[2]
TINY = {"name": "res2net50_26w_4s", "layers": [1, 1, 1, 1], "base_width": 4, "num_classes": 10}
# What a hostile file declares: ~5.6 GB of weights at base_width=2048, 82 GB with 10**7 classes.
HUGE = {**TINY, "base_width": 2048, "num_classes": 10**7}
MB = 1 << 20


def _tiny_state() -> dict:
    return res2net.create_model(**TINY).state_dict()


def _hostile(path: Path, declared: dict = HUGE) -> Path:
    """A train.py-shaped checkpoint: tiny tensors, a recorded model config declaring ``declared``."""
    torch.save({"model": _tiny_state(), "config": {"model": declared}, "epoch": 1}, path)
    return path


def test_a_declared_model_larger_than_its_tensors_is_refused_without_allocating_it():
    """No such check existed: build_model_for built the declared network first (an 82 GB allocation here)."""
    state = _tiny_state()
    check_declared_architecture(resolve_model_config(TINY), state, "checkpoint good.pth")  # fits: no error
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(CheckpointError) as info:
        check_declared_architecture(resolve_model_config(HUGE), state, "checkpoint hostile.pth")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 200 * MB, f"the check raised this process's peak memory by {grown / MB:.0f} MB"
    message = str(info.value)
    assert message.startswith("checkpoint hostile.pth does not fit")
    assert (
        "wrongly shaped keys (86): layer1.0.conv1.weight: checkpoint (16, 64, 1, 1) vs model (8192, 64, 1, 1)"
        in message
    )
    assert (
        "nothing was built): name=res2net50_26w_4s, num_classes=10000000, layers=[1, 1, 1, 1], base_width=2048"
        in message
    )


def test_a_declared_block_count_beyond_the_tensor_count_is_refused_before_any_build():
    """layers=[10**6, ...] would take minutes to build even on the meta device; the tensor count bounds it first."""
    declared = resolve_model_config({**TINY, "layers": [10**6, 1, 1, 1]})
    with pytest.raises(CheckpointError, match=r"checkpoint odd.pth declares layers=\[1000000, 1, 1, 1\], scale=4"):
        check_declared_architecture(declared, _tiny_state(), "checkpoint odd.pth")


def _run_measured(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """(result of ``python *args``, its peak resident memory in bytes), through a wrapper whose only child it is."""
    wrapper = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); sys.exit(p.returncode)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, *args], capture_output=True, text=True, env=env, timeout=240
    )
    *lines, peak = proc.stderr.splitlines()
    proc.stderr = "\n".join(lines)
    return proc, int(peak)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["evaluate", "distill", "export"])
def test_every_entry_point_refuses_a_hostile_declared_architecture_in_one_line(tmp_path, entry, noise_root):
    """Today evaluate.py / distill (train.py) / export.py built the declared model before reading its weights: an
    82 GB allocation, then a traceback (5.6 GB at base_width=2048 alone)."""
    path = _hostile(tmp_path / "hostile.pth")
    tiny = ["model.layers=[1,1,1,1]", "model.base_width=4"]
    commands = {
        "evaluate": [
            str(REPO / "evaluate.py"),
            f"checkpoint={path}",
            "data=folder",
            f"data.root={noise_root}",
            "data.img_size=32",
            "data.num_workers=0",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'eval'}",
            *tiny,
        ],
        "distill": [
            str(REPO / "train.py"),
            "experiment=debug",
            f"distill.teacher={path}",
            f"hydra.run.dir={tmp_path / 'train'}",
        ],
        "export": [
            str(REPO / "scripts" / "export.py"),
            "--model",
            "res2net50_26w_4s",
            "--checkpoint",
            str(path),
            "--format",
            "safetensors",
            "--out",
            str(tmp_path / "m.safetensors"),
        ],
    }
    proc, peak = _run_measured(*commands[entry])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [s for s in proc.stderr.splitlines() if "error: " in s]
    assert str(path) in line and "does not fit" in line, line
    assert "layer1.0.conv1.weight: checkpoint (16, 64, 1, 1) vs model (8192, 64, 1, 1)" in proc.stderr
    assert peak < 2048 * MB, f"{entry} peaked at {peak / MB:.0f} MB"
