"""A DataLoader worker that dies names the file it was decoding (real JPEGs, real workers, a real SIGKILL)."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import WNIDS, write_noise_split

from res2net.data import DataConfig, build_loader
from res2net.data.worker_watch import IDLE, WorkerCrashError

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
BIG_SIDE = 6000  # PIL takes a few hundred ms to decode it: a wide window to kill the worker in


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    write_noise_split(root, "val", 8, seed=3)
    ramp = np.linspace(0, 255, BIG_SIDE, dtype=np.float32)
    big = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), axis=-1).astype(np.uint8)
    Image.fromarray(big).save(root / "val" / WNIDS[-1] / "zz_big.JPEG", quality=75)  # sorts last: sample 8
    return root


def big_path(root: Path) -> str:
    return str(root / "val" / WNIDS[-1] / "zz_big.JPEG")


def val_loader(root: Path, num_workers: int):
    cfg = DataConfig(
        root=str(root), backend="torchvision", batch_size=4, num_workers=num_workers, img_size=32, prefetch=2
    )
    return build_loader(cfg, "val")


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.001)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_decoding(loader, path: str):
    index = loader.paths.index(path)  # world size 1: the position in the val order is the sample index
    return next((pid for pid, busy in loader.worker_table.snapshot() if busy == index and pid > 0), None)


def wait_for_the_error(timeout: float = 30.0):
    """Main thread idles (as during a training step) until torch's SIGCHLD handler raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_killed_worker_names_its_file_while_main_waits_for_a_batch(root, num_workers):
    loader = val_loader(root, num_workers)
    assert loader.paths[-1] == big_path(root)
    killed = []

    def kill_the_big_decode():
        pid = wait_for(lambda: pid_decoding(loader, big_path(root)), "a worker to start decoding the big file")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_big_decode, daemon=True)
    killer.start()
    try:
        with pytest.raises(WorkerCrashError) as info:
            for _ in loader:  # the main thread blocks in next() while the worker decodes
                pass
    finally:
        killer.join(timeout=60)
        loader.close()
    message = str(info.value)
    assert killed, "the worker was never seen decoding the big file"
    assert f"(pid {killed[0]}, killed by signal SIGKILL) died while decoding {big_path(root)}" in message
    assert "out-of-memory killer" in message and "scripts/check_dataset.py" in message
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is not None  # torch's error, chained


def test_killed_worker_names_its_file_while_main_is_elsewhere(root):
    loader = val_loader(root, 1)
    batches = iter(loader)
    next(batches)  # batch 0; the worker goes on prefetching batches 1 and 2 (the big file is in batch 2)
    try:
        pid = wait_for(lambda: pid_decoding(loader, big_path(root)), "the worker to start decoding the big file")
        with pytest.raises(WorkerCrashError) as info:
            os.kill(pid, signal.SIGKILL)
            wait_for_the_error()
    finally:
        loader.close()
    assert f"DataLoader worker 0 (pid {pid}, killed by signal SIGKILL) died while decoding {big_path(root)}" in str(
        info.value
    )


def test_worker_killed_while_idle_says_so(tmp_path):
    write_noise_split(tmp_path, "val", 8, seed=4)
    loader = val_loader(tmp_path, 1)
    assert len(list(loader)) == 2  # the epoch is over: the persistent worker waits for the next one
    try:
        pid = wait_for(
            lambda: next((p for p, busy in loader.worker_table.snapshot() if p > 0 and busy == IDLE), None),
            "the worker to be idle",
        )
        with pytest.raises(WorkerCrashError) as info:
            os.kill(pid, signal.SIGKILL)
            wait_for_the_error()
            list(loader)  # torch's own check, if the signal path did not raise
    finally:
        loader.close()
    message = str(info.value)
    assert f"DataLoader worker 0 (pid {pid}, killed by signal SIGKILL) died while idle" in message
    assert "decoding no file" in message and ".JPEG" not in message and "check_dataset" not in message
    assert "out-of-memory killer" in message


def test_worker_table_is_off_without_workers(root):
    loader = val_loader(root, 0)
    assert loader.worker_table is None
    assert len(list(loader)) == 3
