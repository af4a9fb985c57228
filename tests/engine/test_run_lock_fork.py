"""The run directory's lock belongs to the process that took it (issue 21, item 4): a forked child (a DataLoader
worker) never keeps a killed holder's lock alive, so ``resume=auto`` right after a SIGKILL is never refused; and two
evaluate.py on one output directory cannot both write its results.json."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from res2net.engine.run_lock import RunDirLockedError, run_dir_lock

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, forks a child that keeps running (as a DataLoader worker does), reports both pids, then waits.
_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from res2net.engine.run_lock import run_dir_lock
    with run_dir_lock(sys.argv[1]):
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(os.getpid(), child, flush=True)
        time.sleep(60)
    """
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    """Today's flock lived in the open file description that fork shares: with the holder SIGKILLed and its child
    alive, the lock stayed taken and this raised RunDirLockedError."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    parent, child = map(int, holder.stdout.readline().split())
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {parent} "):  # held while the holder lives
            with run_dir_lock(tmp_path):
                pass
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child is still alive: it is what kept the old lock
        with run_dir_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_child_forked_while_the_lock_is_held_can_take_nothing_of_it(tmp_path):
    """The record lock is the parent's alone: a child forked inside the block is refused like any other process
    (and its exit does not release the parent's lock)."""
    with run_dir_lock(tmp_path):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                with run_dir_lock(tmp_path):
                    code = 4
            except RunDirLockedError:
                code = 0
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with pytest.raises(RunDirLockedError):  # still held by this process after the child closed its copy
            with run_dir_lock(tmp_path):
                pass


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _holds_lock_with_workers(pid: int, run_dir: Path) -> bool:
    """Whether train.py ``pid`` has written itself into the lock file (it holds the lock) and has children (its
    DataLoader workers: start-up runs short-lived helper processes too, before the lock)."""
    try:
        holder = (run_dir / ".lock").read_text()
    except FileNotFoundError:
        return False
    return holder.startswith(f"pid {pid} ") and bool(_children(pid))


def _kill_all(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended by itself
            pass


@pytest.mark.slow
def test_killing_train_py_with_dataloader_workers_at_random_moments_never_blocks_resume(tmp_path, image_folder):
    """SIGKILL train.py's main process at a random moment once its DataLoader workers run, and start ``resume=auto``
    at once, six times; every start takes the lock, and the last run finishes. An orphaned worker notices its dead
    parent only at its next watchdog check (torch: every 5 s), about as long as train.py takes to start here, so
    the killed run's workers are held (SIGSTOP, as a worker stuck in a decode or on a hung file system is) until the
    new run is past its lock, which turns the race into a certainty. Today's flock, whose descriptor the workers
    inherited, refused every such start with "run directory ... is in use" (2 of 3 unheld, as the issue found)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.run.dir={run_dir}",
        "data=folder",
        f"data.root={image_folder}",
        "data.img_size=32",
        "data.batch_size=4",
        "data.num_workers=2",
        "model.layers=[1,1,1,1]",
        "model.base_width=4",
        "schedule.epochs=3",
        "trainer.save_every_steps=2",
        "trainer.log_interval=1",
        "resume=auto",
    ]
    kills, orphans = 0, []
    try:
        while kills < 6:
            # Output to a file, not a pipe: the held workers keep their copy of it open.
            log = tmp_path / f"attempt{kills}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
            deadline = time.monotonic() + 120
            while not _holds_lock_with_workers(proc.pid, run_dir) and proc.poll() is None:
                assert time.monotonic() < deadline, f"seed {seed}: no lock and DataLoader workers after 120 s"
                time.sleep(0.02)
            _kill_all(orphans)  # the previous run's workers may go now: this run got past the lock
            orphans = []
            if proc.poll() is not None:
                text = log.read_text()
                assert proc.returncode == 0 and "in use" not in text, (
                    f"seed {seed}, after {kills} kills:\n{text[-3000:]}"
                )
                break  # the run finished before its kill came
            time.sleep(rng.uniform(0.0, 1.5))
            orphans = _children(proc.pid)
            _kill_all(orphans, signal.SIGSTOP)
            proc.kill()
            proc.wait()
            kills += 1
    finally:
        _kill_all(orphans)
    final = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert final.returncode == 0, f"seed {seed}, after {kills} kills:\n{final.stderr[-3000:]}"
    assert kills >= 3, f"seed {seed}: the run finished after {kills} kills; the test needs a longer run"


@pytest.mark.slow
def test_a_second_evaluate_py_on_one_output_directory_is_refused_and_loses_nothing(tmp_path, image_folder):
    """Two evaluate.py with one hydra.run.dir: today both ran, exited 0 and wrote the same results.json (one
    evaluation lost). Now the second, started while the first holds the directory, ends in one error line naming
    the first, writes nothing, and the first finishes and writes its results."""
    import torch

    import res2net

    checkpoint = tmp_path / "tiny.pth"
    model = res2net.create_model("res2net50_26w_4s", num_classes=3, layers=[1, 1, 1, 1], base_width=4)
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        str(REPO / "evaluate.py"),
        f"checkpoint={checkpoint}",
        "data=folder",
        f"data.root={image_folder}",
        "data.img_size=16",
        "data.num_workers=0",
        "progress=false",
        f"hydra.run.dir={out}",
        "model.layers=[1,1,1,1]",
        "model.base_width=4",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists() or not (out / ".lock").read_text():
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first evaluate.py never locked its output directory"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the directory
        second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        (line,) = [s for s in second.stderr.splitlines() if s.startswith("error: ")]
        assert f"{out} is in use by another evaluate.py (pid {first.pid} " in line, line
        assert not (out / "results.json").exists()
        assert first.wait(timeout=180) == 0, first.communicate()[0][-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.communicate()
    assert json.loads((out / "results.json").read_text())["top1"] >= 0
