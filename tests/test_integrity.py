"""Integrity of what a run reads back (issue 21, item 6): a checkpoint's members are checked against their zip CRCs
on read, so a damaged file is one error naming it; metrics.jsonl is trimmed on resume by writing a new file and
renaming it, so a kill during the trim never loses the history."""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from res2net.errors import CheckpointError
from res2net.models.pretrained import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _flip_tensor_bytes(path: Path, count: int = 64) -> str:
    """Invert ``count`` bytes in the middle of the largest tensor's data in a torch.save archive (the zip itself
    stays well formed); returns that member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    assert member.file_size >= 2 * count
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))
    return member.filename


def test_a_checkpoint_with_flipped_bytes_in_a_tensor_is_refused_naming_it(tmp_path):
    """Today torch.load read the flipped bytes as weights and returned them: no error."""
    path = tmp_path / "last.pth"
    torch.save({"model": {"w": torch.randn(4096), "b": torch.zeros(3)}, "epoch": 1}, path)
    assert read_checkpoint(path)["epoch"] == 1
    member = _flip_tensor_bytes(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} is damaged: member {member} fails its CRC-32 check")
    assert "\n" not in message


@pytest.mark.slow
def test_train_py_refuses_to_resume_from_a_damaged_last_pth(tmp_path):
    """Today a last.pth with 64 flipped bytes resumed, trained on and exited 0."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=debug", f"hydra.run.dir={run}"]
    first = subprocess.run([*cmd, "trainer.max_steps=3"], capture_output=True, text=True, env=_env(), timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.pth"
    member = _flip_tensor_bytes(last)
    resumed = subprocess.run([*cmd, "resume=auto"], capture_output=True, text=True, env=_env(), timeout=240)
    assert resumed.returncode == 1, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    (line,) = [s for s in resumed.stderr.splitlines() if s.startswith("error: ")]
    assert f"checkpoint {last} is damaged: member {member} fails its CRC-32 check" in line, line
