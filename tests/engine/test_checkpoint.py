"""Checkpoint files: atomic writes under kill -9 and a full disk, bounded history, compatibility checks, RNG."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from res2net.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    check_compatible,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_atomic,
)
from res2net.engine.distributed import unwrap_model

REPO = Path(__file__).resolve().parents[2]


def _child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"child exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_save_atomic_round_trip_loads_weights_only(tmp_path):
    path = tmp_path / "x.pth"
    save_atomic({"w": torch.arange(5.0), "n": 3}, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(5.0)) and loaded["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_write_killed_before_rename_leaves_previous_last_loadable(tmp_path):
    last = tmp_path / "last.pth"
    save_atomic({"version": 1, "w": torch.ones(4)}, last)
    marker = tmp_path / "stalled"
    proc = _child(
        """
        import os, sys, time, torch
        from res2net.engine import checkpoint
        def stall(fd):  # all bytes are written; stop before fsync + rename, as a crash there would
            open(sys.argv[2], "w").close()
            time.sleep(600)
        os.fsync = stall
        checkpoint.save_atomic({"version": 2, "w": torch.zeros(1 << 20)}, sys.argv[1])
    """,
        str(last),
        str(marker),
    )
    _wait_for(marker.exists, proc)
    proc.kill()
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pth.tmp-")]
    assert leftovers and leftovers[0].stat().st_size > 4 << 20  # the new file was written half-way
    assert torch.load(last, weights_only=True)["version"] == 1
    CheckpointManager(tmp_path, keep_last=0)  # a new run removes the stale temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "stalled"]


def test_kill_at_a_random_moment_of_repeated_writes_leaves_a_whole_file(tmp_path):
    last = tmp_path / "last.pth"
    proc = _child(
        """
        import sys, torch
        from res2net.engine import checkpoint
        for i in range(10_000):
            checkpoint.save_atomic({"i": i, "w": torch.full((2 << 20,), float(i))}, sys.argv[1])
    """,
        str(last),
    )
    _wait_for(last.exists, proc)
    time.sleep(random.uniform(0.05, 1.0))
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(last, weights_only=True)
    assert torch.equal(ckpt["w"], torch.full((2 << 20,), float(ckpt["i"])))


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_path(tmp_path):
    last = tmp_path / "last.pth"
    proc = _child(
        """
        import resource, signal, sys, torch
        from res2net.engine import checkpoint
        checkpoint.save_atomic({"version": 1}, sys.argv[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            checkpoint.save_atomic({"version": 2, "w": torch.zeros(1 << 20)}, sys.argv[1])
        except checkpoint.CheckpointError as err:
            print(err)
    """,
        str(last),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"could not write checkpoint {last}" in out and "previous" in out and "intact" in out
    assert torch.load(last, weights_only=True)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


@contextlib.contextmanager
def _unwritable(folder):
    """The folder refuses new files: read-only mode for a normal user; for root (which ignores modes, as CI runs)
    the immutable attribute, which binds root too."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without a working chattr +i: no way to make a folder unwritable")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_unwritable_folder_names_the_path(tmp_path):
    save_atomic({"version": 1}, tmp_path / "last.pth")
    with _unwritable(tmp_path):
        with pytest.raises(CheckpointError, match=str(tmp_path / "last.pth")):
            save_atomic({"version": 2}, tmp_path / "last.pth")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_manager_keeps_best_and_a_bounded_history(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch in range(1, 6):
        manager.save({"epoch": epoch}, is_best=epoch == 3, epoch_end=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "epoch_0004.pth", "epoch_0005.pth", "last.pth"]
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 5
    manager.save({"epoch": 5}, epoch_end=False)  # a mid-epoch save touches last.pth only
    assert len(list(tmp_path.iterdir())) == 4


def test_incompatible_config_is_refused_naming_every_differing_key():
    saved = {
        "model": {"name": "res2net50_26w_4s", "scale": 4},
        "optim": {"lr": 0.1},
        "resume": "",
        "trainer": {"max_steps": 0, "seed": 0},
    }
    now = {
        "model": {"name": "res2net50_26w_8s", "scale": 8},
        "optim": {"lr": 0.1},
        "resume": "auto",
        "trainer": {"max_steps": 100, "seed": 1},
    }
    with pytest.raises(CheckpointError) as info:
        check_compatible(saved, now, path="ck.pth")
    message = str(info.value)
    assert "ck.pth" in message
    for key in ("model.name", "model.scale", "trainer.seed"):
        assert key in message
    assert "max_steps:" not in message and "resume:" not in message  # operational keys may change
    check_compatible(saved, {**saved, "resume": "auto", "trainer": {"max_steps": 9, "seed": 0}})


def test_a_knob_newer_than_the_checkpoint_may_stay_at_its_default():
    saved = {"optim": {"lr": 0.1}}  # written before optim.name and mixup existed
    defaults = {"optim": {"name": "sgd", "lr": 0.1}, "mixup": {"alpha": 0.0}}
    check_compatible(saved, {"optim": {"lr": 0.1, "name": "sgd"}, "mixup": {"alpha": 0.0}}, defaults=defaults)
    with pytest.raises(CheckpointError, match=r"mixup.alpha: checkpoint '<absent>' vs now 0.2"):
        check_compatible(saved, {"optim": {"lr": 0.1, "name": "sgd"}, "mixup": {"alpha": 0.2}}, defaults=defaults)
    with pytest.raises(CheckpointError, match="optim.name"):  # without defaults every new key is a difference
        check_compatible(saved, {"optim": {"lr": 0.1, "name": "sgd"}})


def test_load_checkpoint_refuses_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "released.pth")
    with pytest.raises(CheckpointError, match="not a train.py checkpoint"):
        load_checkpoint(tmp_path / "released.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_resolve_resume(tmp_path):
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to continue yet: a fresh start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pth").write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "last.pth"
    with pytest.raises(FileNotFoundError, match="resume='nope.pth'"):
        resolve_resume("nope.pth", tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_atomic({"rng": capture_rng()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_unwrap_model_strips_compile_and_ddp_wrappers():
    net = torch.nn.Linear(2, 2)
    compiled = torch.compile(net)
    assert unwrap_model(compiled) is net
    assert list(unwrap_model(compiled).state_dict()) == ["weight", "bias"]
