"""Failure paths of a real torchrun job: a rank that dies takes the job down instead of hanging the others; a
preemption signal that every process gets (twice, through torchrun) still ends in one checkpoint."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_train import TORCHRUN_TRAIN

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in env if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _start_two_rank_job(run_dir: Path) -> subprocess.Popen:
    """A 2-process torchrun job of the debug experiment, returned once it has logged two training steps."""
    overrides = [
        "experiment=debug",
        f"hydra.run.dir={run_dir}",
        "data.synthetic_train_size=4096",
        "schedule.epochs=1",
        "trainer.log_interval=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    agent = subprocess.Popen(
        [*TORCHRUN_TRAIN, *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if agent.poll() is not None or time.monotonic() > deadline:
            agent.kill()
            pytest.fail(f"the job did not start training: {agent.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return agent


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc (Linux)")
def test_a_rank_killed_mid_run_takes_the_job_down_promptly(tmp_path):
    agent = _start_two_rank_job(tmp_path)
    try:
        victim = next(pid for pid in _children(agent.pid) if _rank_of(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert time.monotonic() - killed_at < 60  # the surviving rank did not wait for the collective timeout
    assert "Signals.SIGKILL" in out or "SIGKILL" in out or "exitcode" in out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc (Linux)")
def test_preemption_signal_to_every_process_and_again_from_torchrun_still_checkpoints(tmp_path):
    """SLURM's preemption SIGTERM reaches the agent and both workers; the agent forwards it again. Both ranks
    checkpoint together and end within torchrun's grace period, and only rank 0 says where the checkpoint is."""
    import torch

    agent = _start_two_rank_job(tmp_path)
    try:
        workers = [pid for pid in _children(agent.pid) if _rank_of(pid) is not None]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)  # the workers' handlers have run (two signals pending at once would arrive as one)
        os.kill(agent.pid, signal.SIGTERM)  # torchrun sends each worker SIGTERM once more, mid-step or mid-save
        out, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert out.count("stop requested by signal") == 1, out[-3000:]
    assert out.count("preempted: wrote") == 1 and "checkpoint None" not in out, out[-3000:]
    assert "closing signal SIGKILL" not in out, out[-3000:]  # torchrun's next step when workers outlive 30 s
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == len(logged) >= 2
