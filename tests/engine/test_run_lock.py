"""One writer per run directory: two real train.py processes on one directory, a SIGKILLed holder that does not block
resume=auto, and every file the runs write loading tensors-only."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from res2net.engine.run_lock import LOCK_FILE, RunDirLockedError, run_dir_lock
from res2net.models.pretrained import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
# experiment=debug with an EMA and mid-epoch checkpoints, so every kind of file train.py writes appears.
OVERRIDES = [
    "experiment=debug",
    "data.synthetic_train_size=4096",
    "trainer.log_interval=1",
    "trainer.save_every_steps=2",
    "trainer.ema_decay=0.9",
    "trainer.keep_last=2",
]


def test_a_second_lock_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    with run_dir_lock(tmp_path):
        with pytest.raises(RunDirLockedError, match=f"{tmp_path}.*pid {os.getpid()} on host {socket.gethostname()}"):
            with run_dir_lock(tmp_path):
                pass
    with run_dir_lock(tmp_path):  # released on leaving the block
        assert (tmp_path / LOCK_FILE).is_file()


def _train(run_dir: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *OVERRIDES, *extra]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    files = [*run_dir.glob("checkpoints/*"), run_dir / "metrics.jsonl", run_dir / "config.yaml"]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()}


def test_second_train_py_is_refused_and_a_killed_holder_does_not_block_resume(tmp_path):
    holder = _train(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "checkpoints" / "last.pth").exists():
            assert holder.poll() is None, holder.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder.send_signal(signal.SIGSTOP)  # frozen: the directory cannot change under the snapshot
        before = _snapshot(tmp_path)
        start = time.monotonic()
        second = _train(tmp_path, "resume=auto")
        assert time.monotonic() - start < 60  # exits at start-up: it never waits for the lock
        assert second.returncode == 1, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        (line,) = [s for s in second.stderr.splitlines() if s.startswith("error: ")]
        assert (
            f"run directory {tmp_path} is in use" in line and f"pid {holder.pid} on host {socket.gethostname()}" in line
        )
        assert _snapshot(tmp_path) == before  # it touched none of the run's files
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    resumed = _train(tmp_path, "resume=auto", "trainer.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    _assert_every_file_loads_tensors_only(tmp_path)


def _assert_every_file_loads_tensors_only(run_dir: Path) -> None:
    written = sorted(run_dir.rglob("*.pth"))
    assert {p.name for p in written} >= {"last.pth", "best.pth"}, written
    for path in written:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["ema"] is not None and ckpt["rng"], path
        numpy_state = ckpt["rng"][0]["numpy"]
        assert torch.is_tensor(numpy_state[1]) and not any(type(v).__module__ == "numpy" for v in numpy_state)
        assert read_checkpoint(path)["global_step"] == ckpt["global_step"]
