"""train.py end to end as real processes: torchrun with gloo, kill -9 / SIGTERM and exact resume, NaN stop.

Tiny Res2Net (base_width 4, one block per stage) on a generated ImageFolder of 32 px JPEGs, torchvision backend.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import res2net
from res2net.engine.stop import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
# train.py under torchrun with two local processes (gloo on the CPU).
TORCHRUN_TRAIN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    str(REPO / "train.py"),
]
CLASSES = ("n0001", "n0002", "n0003", "n0004")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3  # 32 train images: 8 steps of 4 per epoch on one process
TINY_MODEL = {"model.base_width": 4, "model.layers": "[1,1,1,1]"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Class-coloured noise, so the model learns something and the loss moves."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 96, (40, 40, 3)) + np.array([160 if c == label % 3 else 0 for c in range(3)])
                if label == 3:
                    pixels[:, :20] = 255
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    root / split / wnid / f"{i}.JPEG", quality=90
                )
    return root


def _overrides(folder: Path, **extra) -> list[str]:
    settings = {
        "data": "folder",
        "data.root": str(folder),
        "data.img_size": 32,
        "data.batch_size": 4,
        "data.num_workers": 0,
        **TINY_MODEL,
        "schedule.epochs": 2,
        "schedule.milestones": "[1]",
        "trainer.log_interval": 1,
        "trainer.deterministic": "true",
        "trainer.keep_last": 1,
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONPATH=str(REPO))


def _train(run_dir: Path, folder: Path, **extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *_overrides(folder, **extra)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300)


def _start(run_dir: Path, folder: Path, **extra) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *_overrides(folder, **extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in lines if r["kind"] == kind]


def _wait_until_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not any(r["step"] >= step for r in _records(run_dir, "train")):
        assert proc.poll() is None, f"train.py ended before step {step}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder) -> dict:
    """An uninterrupted deterministic run: 2 epochs x 8 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _train(run_dir, folder)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ckpt = _last(run_dir)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (2, 0, 16)
    ckpt["path"] = run_dir / "checkpoints" / "last.pth"
    return ckpt


def test_torchrun_two_processes_write_one_run_dir(tmp_path, folder):
    cmd = [
        *TORCHRUN_TRAIN,
        *_overrides(folder, **{"trainer.deterministic": "false", "trainer.ema_decay": 0.9}),
    ]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*")]
    assert len(run_dirs) == 1, run_dirs  # not one per rank
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        ".lock",  # rank 0's lock on the run directory (res2net/engine/run_lock.py)
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "tb",
        "train.log",
    ]
    assert sorted(p.name for p in run_dir.rglob("*.log")) == ["train.log"]
    epochs = _records(run_dir, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["global_step"] == 4 * (r["epoch"] + 1) for r in epochs)  # 16 images per rank, batch 4
    assert all(
        {"val_top1", "val_top5", "val_loss", "val_top1_ema", "epoch_time_s", "img_per_s"} <= r.keys() for r in epochs
    )
    assert all(r["world_size"] == 2 and r["device"] == "cpu" for r in epochs)
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"loss", "lr", "img_per_s", "data_wait_frac"} <= train[0].keys()
    assert train[0]["lr"] == pytest.approx(0.1 * 8 / 256)  # 2 processes x batch 4, linear scaling

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/val_top1", "epoch/val_top5", "epoch/val_loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("epoch/val_top1")] == [4, 8]
    assert events.Scalars("epoch/val_top1")[-1].value == pytest.approx(epochs[-1]["val_top1"])

    ckpt = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["config"]["model"]["name"] == "res2net50_26w_4s"
    ours = res2net.create_model("res2net50_26w_4s", num_classes=4, base_width=4, layers=[1, 1, 1, 1])
    ours.load_state_dict(ckpt["model"], strict=True)
    ours.load_state_dict(ckpt["ema"], strict=True)
    import timm

    reference = timm.create_model("res2net50_26w_4s", num_classes=4, base_width=4, layers=[1, 1, 1, 1])
    reference.load_state_dict(ckpt["model"], strict=True)
    best = torch.load(run_dir / "checkpoints" / "best.pth", weights_only=True)
    assert best["best_top1"] == max(r["val_top1"] for r in epochs)


def test_kill_9_at_a_random_step_then_resume_auto_is_bit_exact(tmp_path, folder, reference):
    step = random.randint(4, 14)  # from step 4 on, the save at step 3 has finished: there is a checkpoint to resume
    proc = _start(tmp_path, folder, **{"trainer.save_every_steps": 3})
    _wait_until_step(proc, tmp_path, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = _last(tmp_path)
    assert interrupted["global_step"] < 16, f"kill came too late (step {step})"
    resumed = _train(tmp_path, folder, **{"trainer.save_every_steps": 3, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.pth'}" in resumed.stdout
    final = _last(tmp_path)
    assert final["global_step"] == 16
    _assert_same_weights(final, reference)
    steps = [r["step"] for r in _records(tmp_path, "train")]
    assert steps == list(range(1, 17)), "metrics.jsonl must describe one trajectory"


def test_sigterm_checkpoints_the_exact_position_and_resume_is_bit_exact(tmp_path, folder, reference):
    proc = _start(tmp_path, folder)
    _wait_until_step(proc, tmp_path, 3)  # mid-epoch 0 (8 steps per epoch)
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    ckpt = _last(tmp_path)
    logged = max(r["step"] for r in _records(tmp_path, "train"))
    assert ckpt["global_step"] == logged and 3 <= logged < 16  # nothing after the checkpointed step
    assert ckpt["step_in_epoch"] == logged % 8 or (ckpt["step_in_epoch"] == 8 and logged == 8)
    assert "resume=auto" in err
    resumed = _train(tmp_path, folder, resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    _assert_same_weights(_last(tmp_path), reference)


def test_a_repeated_signal_while_the_checkpoint_is_pending_does_not_kill_the_run(tmp_path, folder):
    """SLURM signals every process and torchrun forwards its own copy: a worker gets SIGTERM twice (or SIGUSR1 then
    SIGTERM) and must still write its checkpoint and exit with the documented code."""
    proc = _start(tmp_path, folder)
    _wait_until_step(proc, tmp_path, 2)
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1):
        proc.send_signal(signum)
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == max(r["step"] for r in _records(tmp_path, "train")) >= 2
    assert out.count("preempted: wrote") == 1 and "resume=auto" in out


def test_the_task_function_does_not_carry_the_submitting_machines_rank_or_device():
    """Hydra's submitit launcher cloudpickles the task function with the globals it uses and runs it on the cluster:
    a DistInfo (rank, device) made at import on the submitting machine would travel into every job."""
    import runpy

    import cloudpickle

    entry = runpy.run_path(str(REPO / "train.py"), run_name="train_entry")  # not importable: pickled by value
    payload = cloudpickle.dumps(entry["main"].__wrapped__)  # the undecorated function is what Hydra hands on
    assert b"process_group" in payload  # the function's own code came along, not a reference to it
    assert b"DistInfo" not in payload


def test_non_finite_loss_stops_naming_the_position_and_last_good_checkpoint(tmp_path, folder):
    proc = _train(tmp_path, folder, **{"optim.lr": 1e12, "trainer.save_every_steps": 1})
    assert proc.returncode == 1
    assert "non-finite training loss" in proc.stdout
    last = tmp_path / "checkpoints" / "last.pth"
    assert f"Last good checkpoint: {last}" in proc.stdout
    assert "epoch 0 (0-based), step " in proc.stdout
    ckpt = _last(tmp_path)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_max_steps_smoke_run_on_a_folder(tmp_path, folder):
    proc = _train(tmp_path, folder, **{"trainer.max_steps": 3, "trainer.deterministic": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "max_steps after 0 epochs (global step 3)" in proc.stdout
    ckpt = _last(tmp_path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3)
    (epoch,) = _records(tmp_path, "epoch")
    assert epoch["partial"] is True and epoch["global_step"] == 3


def test_resume_from_another_architecture_is_refused(tmp_path, folder, reference):
    other = _train(tmp_path, folder, **{"resume": reference["path"], "model": "res2net50_26w_8s"})
    assert other.returncode == 1
    assert "cannot resume from" in other.stdout and "model.name: checkpoint 'res2net50_26w_4s'" in other.stdout
    assert "model.scale: checkpoint 4 vs now 8" in other.stdout


@pytest.mark.slow
def test_torchrun_resume_from_max_steps_is_bit_exact_with_dropout(tmp_path):
    """Two ranks, dropout drawing from each rank's torch generator: per-rank RNG states make the resume exact."""
    common = ["experiment=debug", "data.synthetic_train_size=128", "trainer.deterministic=true", "model.drop_rate=0.3"]
    torchrun = [
        *TORCHRUN_TRAIN,
        *common,
    ]
    for run_dir, extra in (("a", []), ("b", ["trainer.max_steps=5"]), ("b", ["resume=auto"])):
        proc = subprocess.run(
            [*torchrun, f"hydra.run.dir={tmp_path / run_dir}", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "step 5/8" in proc.stdout
    a, b = _last(tmp_path / "a"), _last(tmp_path / "b")
    assert a["global_step"] == b["global_step"] == 16
    _assert_same_weights(a, b)


def test_resume_mid_epoch_with_dropout_and_torchvision_workers_is_bit_exact(tmp_path, folder):
    """Dropout draws from torch's global generator and the torchvision backend starts DataLoader iterators: the
    resumed run is bit-exact only if creating an iterator draws nothing from that generator (the RNG states are
    restored once, at resume, before the first step)."""
    extra = {"model.drop_rate": 0.3, "data.num_workers": 1}
    assert _train(tmp_path / "a", folder, **extra).returncode == 0
    assert _train(tmp_path / "b", folder, **extra, **{"trainer.max_steps": 5}).returncode == 0
    resumed = _train(tmp_path / "b", folder, **extra, resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "step 5/8" in resumed.stdout
    _assert_same_weights(_last(tmp_path / "a"), _last(tmp_path / "b"))


def test_torchrun_gradient_accumulation_steps_and_scales_the_lr_by_the_effective_batch(tmp_path, folder):
    """2 processes x batch 4 x trainer.accum_steps=2 under DDP (no_sync on the first micro-step): 16 images per rank
    make 4 micro-batches, so 2 optimizer steps per epoch, at lr 0.1 x (4 x 2 x 2) / 256."""
    cmd = [
        *TORCHRUN_TRAIN,
        f"hydra.run.dir={tmp_path}",
        *_overrides(folder, **{"trainer.accum_steps": 2, "trainer.deterministic": "false"}),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ckpt = _last(tmp_path)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["world_size"]) == (2, 4, 2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([0.1 * 16 / 256] * 2 + [0.01 * 16 / 256] * 2)  # / 10 from epoch 1 (milestones [1])
