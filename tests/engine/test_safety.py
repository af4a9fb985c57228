"""Checkpoints never run code unless trusted, and user errors end train.py / evaluate.py / scripts in one
``error: ...`` line with a documented exit code (res2net/errors.py); real entry points as subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import res2net
from res2net.config import check_train_config, register_configs
from res2net.engine.checkpoint import load_checkpoint
from res2net.errors import (
    FAILURE_EXIT_CODE,
    USAGE_EXIT_CODE,
    CheckpointError,
    ConfigError,
    UnsafeCheckpointError,
    exit_code,
)
from res2net.models.pretrained import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = {"layers": [1, 1, 1, 1], "base_width": 4}
TINY_OVERRIDES = ["model.layers=[1,1,1,1]", "model.base_width=4"]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    """(a train.py-looking checkpoint whose pickle runs a command, the marker file that command creates)."""
    marker = tmp_path / "marker"
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, **TINY)
    path = tmp_path / "hostile.pth"
    torch.save({"model": model.state_dict(), "extra": _Payload(marker), "config": {}}, path)
    return path, marker


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "val" / cls / f"{i}.jpg")
    return root


def _run(script: str, *args: str, debug: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **({"HYDRA_FULL_ERROR": "1"} if debug else {}))
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180
    )


def _evaluate(tmp_path: Path, folder: Path, checkpoint, *extra: str, debug: bool = False):
    return _run(
        "evaluate.py",
        f"checkpoint={checkpoint}",
        "data=folder",
        f"data.root={folder}",
        "data.backend=torchvision",
        "data.img_size=16",
        "data.num_workers=0",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
        *TINY_OVERRIDES,
        *extra,
        debug=debug,
    )


def _short_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The one `error:` line (and its hint lines) of a run that failed with ``code``; asserts there is no traceback."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- a checkpoint that runs code when unpickled -------------------------------------------------------------------


def test_hostile_pickle_runs_nothing_through_any_library_reader(tmp_path):
    path, marker = _hostile(tmp_path)
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, **TINY)
    for read in (read_checkpoint, load_checkpoint, lambda p: res2net.load_pretrained(model, p)):
        with pytest.raises(UnsafeCheckpointError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "arbitrary code" in message and "posix.system" in message
        assert "trusted=True" in message and "trust_checkpoint=true" in message
    assert not marker.exists()
    read_checkpoint(path, trusted=True)  # the opt-in does unpickle it: the payload is live
    assert marker.exists()


def test_hostile_pickle_runs_nothing_through_evaluate_and_train(tmp_path, val_folder):
    path, marker = _hostile(tmp_path)
    evaluate = _evaluate(tmp_path, val_folder, path)
    _short_error(evaluate, FAILURE_EXIT_CODE, str(path), "arbitrary code")
    assert "trust_checkpoint=true" in evaluate.stderr  # the hint line names the opt-in
    train = _run("train.py", "experiment=debug", f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}")
    _short_error(train, FAILURE_EXIT_CODE, str(path), "arbitrary code")
    assert not marker.exists()


def test_trust_checkpoint_opts_in_for_evaluate(tmp_path, val_folder):
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, **TINY)
    path = tmp_path / "with_numpy.pth"  # an older checkpoint: numpy arrays need the full unpickler
    torch.save({"model": model.state_dict(), "rng": np.random.get_state()}, path)
    refused = _evaluate(tmp_path, val_folder, path)
    assert "trust_checkpoint=true" in refused.stderr
    _short_error(refused, FAILURE_EXIT_CODE, str(path), "numpy")
    trusted = _evaluate(tmp_path, val_folder, path, "trust_checkpoint=true")
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert (tmp_path / "eval" / "results.json").is_file()


# --- damaged and wrong checkpoints, told apart --------------------------------------------------------------------


def _damaged(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error says)."""
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, **TINY)
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp_path / "a_run_dir").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    wide = res2net.create_model("res2net50_26w_4s", num_classes=2, layers=[1, 1, 1, 1], base_width=8)
    torch.save(wide.state_dict(), tmp_path / "other_arch.pth")
    from safetensors.torch import save_file

    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}
    save_file(partial, tmp_path / "partial.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return {
        "empty": (tmp_path / "empty.pth", "is empty (0 bytes)"),
        "truncated": (tmp_path / "truncated.pth", "is truncated"),
        "garbage": (tmp_path / "garbage.pth", "is not a PyTorch checkpoint"),
        "directory": (tmp_path / "a_run_dir", "is a directory"),
        "not_weights": (tmp_path / "tensor.pth", "holds a Tensor"),
        "other_arch": (tmp_path / "other_arch.pth", "wrongly shaped keys"),
        "safetensors_missing_keys": (tmp_path / "partial.safetensors", "missing keys"),
        "safetensors_damaged": (tmp_path / "bad.safetensors", "is not a valid safetensors file"),
    }


def test_damaged_checkpoints_are_told_apart(tmp_path):
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, **TINY)
    for name, (path, says) in _damaged(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            res2net.load_pretrained(model, path)
        assert str(path) in str(info.value) and says in str(info.value), name
        assert exit_code(info.value) == FAILURE_EXIT_CODE


def test_random_bytes_are_never_called_damaged_checkpoints(tmp_path):
    # os.urandom once failed CI: a random file now and then parses as a short pickle, or makes torch's reader raise
    # IndexError instead of UnpicklingError. Every seed and size must give the same "not a checkpoint" line.
    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pth"
    for size in (1, 2, 3, 8, 64, 4096):
        for _ in range(150):
            path.write_bytes(rng.bytes(size))
            with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint: neither"):
                read_checkpoint(path)


@pytest.mark.parametrize("name", ["empty", "directory", "other_arch", "safetensors_missing_keys"])
def test_evaluate_reports_a_damaged_checkpoint_in_one_line(tmp_path, val_folder, name):
    path, says = _damaged(tmp_path)[name]
    proc = _evaluate(tmp_path, val_folder, path)
    line = _short_error(proc, FAILURE_EXIT_CODE, str(path))
    assert says in proc.stderr, line


def test_debug_switch_shows_the_traceback_with_the_same_exit_code(tmp_path, val_folder):
    path, _ = _damaged(tmp_path)["empty"]
    proc = _evaluate(tmp_path, val_folder, path, debug=True)
    assert proc.returncode == FAILURE_EXIT_CODE
    assert "Traceback" in proc.stderr and f"error: checkpoint {path} is empty" in proc.stderr


# --- config, usage and data errors at start-up --------------------------------------------------------------------


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=debug", *overrides])


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=nan",
        "optim.lr=inf",
        "optim.lr=-0.1",
        "optim.lr=0",
        "data.batch_size=-8",
        "data.batch_size=0",
        "schedule.epochs=-1",
        "data.crop_pct=nan",
        "data.crop_pct=-0.5",
        "data.crop_pct=1.5",
        "label_smoothing=nan",
        "label_smoothing=inf",
        "label_smoothing=-0.1",
        "optim.weight_decay=nan",
        "schedule.warmup_epochs=-inf",
        "data.std=[0.2,0,0.2]",
        "data.mean=[nan,0.4,0.4]",
        "trainer.seed=-1",
        "model.drop_rate=nan",
    ],
)
def test_non_finite_or_negative_values_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1].replace("[", r"\[")) as info:
        check_train_config(_compose(override))
    assert exit_code(info.value) == USAGE_EXIT_CODE


def test_train_config_error_exits_2_in_one_line(tmp_path):
    proc = _run("train.py", "experiment=debug", "optim.lr=nan", f"hydra.run.dir={tmp_path}")
    _short_error(proc, USAGE_EXIT_CODE, "optim.lr=nan")
    assert not (tmp_path / "checkpoints").exists()


def test_bad_override_exits_2_with_hydras_message(tmp_path):
    proc = _run("train.py", "trainer.max_stepz=3", cwd=tmp_path)
    assert proc.returncode == USAGE_EXIT_CODE
    assert "Key 'max_stepz' not in 'TrainerConfig'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_root_is_a_runtime_error_in_one_line(tmp_path):
    missing = tmp_path / "no_imagenet"
    proc = _run("train.py", *TINY_OVERRIDES, "data=folder", f"data.root={missing}", f"hydra.run.dir={tmp_path / 'r'}")
    _short_error(proc, FAILURE_EXIT_CODE, str(missing))


def test_scripts_report_user_errors_in_one_line(tmp_path):
    missing = tmp_path / "nothing_here"
    proc = _run("scripts/check_dataset.py", str(missing), "--no-progress")
    assert proc.returncode == 1 and f"error: {missing} is neither a file nor a folder" in proc.stderr


def test_bugs_keep_their_traceback():
    assert exit_code(KeyError("x")) is None and exit_code(TypeError("x")) is None
    try:
        torch.zeros(2).view(3)  # a RuntimeError raised inside torch: a bug of ours, not a user error
    except RuntimeError as err:
        assert exit_code(err) is None
    try:
        int("not a number")  # a builtin's error, even when called from the project's code
    except ValueError as err:
        assert exit_code(err) is None
    try:
        raise ValueError("data.img_size=-1 is invalid")  # a raise statement of the project: a user error
    except ValueError as err:
        assert exit_code(err) == USAGE_EXIT_CODE
