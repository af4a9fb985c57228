"""train.py and evaluate.py as a person meets them, as real processes (issue 21, items 2, 3, 7, 9): Ctrl-C is a stop
with a checkpoint, the run directory alone resumes a run, a refused attempt leaves the run's records as they were,
an early signal is a stop, errors are one line, and the console names the data set and draws bars on a terminal.

Reuses test_train's tiny Res2Net on 32 px JPEGs (its `folder` and uninterrupted `reference` run)."""

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_train
from PIL import Image
from test_train import REPO, _assert_same_weights, _env, _last, _overrides, _records, _start, _train, _wait_until_step

from res2net.engine.stop import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
folder = test_train.folder  # the fixtures, shared by name
reference = test_train.reference


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env or _env(), timeout=300, cwd=REPO
    )


def _caught(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


def test_ctrl_c_mid_epoch_checkpoints_and_the_run_directory_alone_resumes_it_bit_exact(tmp_path, folder, reference):
    proc = _start(tmp_path, folder)
    _wait_until_step(proc, tmp_path, 3)  # mid-epoch 0 (8 steps per epoch)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == max(r["step"] for r in _records(tmp_path, "train")) < 16
    assert f"interrupted (Ctrl-C): wrote {tmp_path / 'checkpoints' / 'last.pth'}" in out
    assert f"continue with: python train.py hydra.run.dir={tmp_path} resume=auto" in out
    # Exactly the command it printed: no override retyped.
    resumed = _run(str(REPO / "train.py"), f"hydra.run.dir={tmp_path}", "resume=auto")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    _assert_same_weights(_last(tmp_path), reference)
    assert [r["step"] for r in _records(tmp_path, "train")] == list(range(1, 17))


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, folder):
    proc = _start(tmp_path, folder)
    _wait_until_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out[-3000:]
    assert "error: interrupted (Ctrl-C): stopped at once" in out
    assert "Traceback" not in out and "interrupted (Ctrl-C): wrote" not in out


def test_a_signal_during_start_up_is_a_stop_request_not_a_kill(tmp_path, folder):
    """The handlers come before the heavy imports: SIGTERM sent while torch is still loading ends the run after its
    first step with a checkpoint and exit 75 (a requeue-on-75 wrapper keeps the job)."""
    proc = _start(tmp_path, folder)
    deadline = time.monotonic() + 60
    while not _caught(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "the stop handlers were installed only after torch had loaded"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert _last(tmp_path)["global_step"] == 1


def test_a_refused_resume_leaves_the_runs_records_untouched(tmp_path, folder):
    first = _train(tmp_path, folder, **{"trainer.max_steps": 2})
    assert first.returncode == 0, first.stdout[-3000:]
    records = {name: (tmp_path / name).read_bytes() for name in (".hydra/overrides.yaml", ".hydra/config.yaml")}
    records["config.yaml"] = (tmp_path / "config.yaml").read_bytes()
    refused = _run(str(REPO / "train.py"), f"hydra.run.dir={tmp_path}", "resume=auto", "model.base_width=8")
    assert refused.returncode == 1, (refused.stdout + refused.stderr)[-3000:]
    assert "cannot resume from" in refused.stderr and "model.base_width: checkpoint 4 vs now 8" in refused.stderr
    for name, content in records.items():
        assert (tmp_path / name).read_bytes() == content, f"the refused attempt rewrote {name}"
    (attempt,) = (tmp_path / ".hydra").glob("attempt-*")
    assert "model.base_width=8" in (attempt / "overrides.yaml").read_text()


def test_a_resume_with_another_head_is_one_line_and_exit_1(tmp_path, folder, reference):
    other = tmp_path / "three_classes"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n0001", "n0002", "n0003"):
            (other / split / wnid).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    other / split / wnid / f"{i}.JPEG"
                )
    proc = _train(tmp_path / "run", other, resume=reference["path"])
    assert proc.returncode == 1, proc.stdout[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert "fc.weight: checkpoint [4, " in line and "vs model [3, " in line
    assert "size mismatch" not in proc.stdout  # torch's multi-line text


def test_a_misspelt_model_group_is_one_short_line():
    proc = _run(str(REPO / "train.py"), "model=res2net50_26w_4", env={**_env(), "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: model=res2net50_26w_4:")
    assert "did you mean res2net50_26w_4s" in proc.stderr


def test_the_console_names_the_data_set_and_draws_bars_only_on_a_terminal(tmp_path, folder, reference):
    """stderr on a pseudo-terminal: tqdm bars (train and eval); the log file holds plain lines only."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read_terminal():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={tmp_path}", *_overrides(folder)]
    cmd += ["trainer.max_steps=3"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(), timeout=300)
    ev = [
        sys.executable,
        str(REPO / "evaluate.py"),
        f"hydra.run.dir={tmp_path / 'eval'}",
        f"checkpoint={reference['path']}",
    ]
    ev += [o for o in _overrides(folder) if o.split("=")[0].split(".")[0] in ("data", "model")] + ["device=cpu"]
    evaluated = subprocess.run(ev, stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(), timeout=300)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0 and evaluated.returncode == 0, (proc.stdout + evaluated.stdout)[-3000:]
    assert "\r" in terminal and f"epoch 1/2 on {folder.name}" in terminal and "eval" in terminal
    log = (tmp_path / "train.log").read_text()
    assert "\r" not in log and f"step 1/8 on {folder.name}" in log
    assert f"images of {folder.name})" in log
    assert f"on {folder.name}: top-1" in evaluated.stdout and "on imagenet" not in evaluated.stdout
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["dataset"] == folder.name
