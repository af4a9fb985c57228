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

REPO = Path(__file__).resolve().parents[2]


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


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=_env(), timeout=120
    )


def _history(path: Path, steps: int) -> str:
    """A metrics.jsonl of ``steps`` train records (~100 bytes each) with a line cut by a kill at the end."""
    lines = [
        f'{{"kind": "train", "epoch": 0, "step": {s}, "loss": {1 / s:.12f}, "pad": "{"x" * 40}"}}'
        for s in range(1, steps + 1)
    ]
    text = "\n".join(lines) + '\n{"kind": "tra'
    path.write_text(text)
    return text


def test_a_kill_during_the_trim_leaves_the_whole_history(tmp_path):
    """The trim is killed mid-write (SIGXFSZ, whose default action kills, fires as the written file passes a size
    limit: a kill at a known moment). Today's trim rewrote metrics.jsonl in place: the kill left it cut to the
    limit (0 bytes had the kill come before the first write), the history lost."""
    path = tmp_path / "metrics.jsonl"
    before = _history(path, 20000)  # ~1.6 MB; the trim keeps ~1.2 MB
    killed = _child(
        """
        import resource, signal, sys
        from res2net.engine.metrics import MetricsWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; its default action is to kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
        MetricsWriter(sys.argv[1], enabled=True, purge_after=15000)
        """,
        str(tmp_path),
    )
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-3000:]
    assert path.read_text() == before  # untouched: the kill hit the new file, not the history
    done = _child(
        "import sys\nfrom res2net.engine.metrics import MetricsWriter\nMetricsWriter(sys.argv[1], True, 15000).close()",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in path.read_text().splitlines()]
    assert steps == list(range(1, 15001))  # trimmed past 15000, the cut line dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tb"]  # the killed trim's file is gone


_FILL = """
    import resource, signal, sys
    from res2net.engine.metrics import MetricsWriter
    from res2net.errors import exit_code, report
    writer = MetricsWriter(sys.argv[1], enabled=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    record = {"kind": "train", "note": "x" * int(sys.argv[3]), **{f"m{i}": 0.5 for i in range(int(sys.argv[2]))}}
    try:
        for step in range(100000):
            writer.write({**record, "step": step}, step)
    except Exception as err:
        print(exit_code(err))
        report(err)
    finally:
        writer.close()
"""


@pytest.mark.parametrize(("numbers", "text", "names"), [(1, 500, "metrics.jsonl"), (60, 0, "tb")])
def test_a_full_disk_while_writing_the_run_records_is_one_error_line(tmp_path, numbers, text, names):
    """Today the OSError from metrics.jsonl's write or TensorBoard's flush went up as a traceback (exit_code None:
    a bug), TensorBoard's also printed by its writer thread. A record with a long text field fills metrics.jsonl
    first; one with many numbers fills the TensorBoard events file first."""
    proc = _child(_FILL, str(tmp_path), str(numbers), str(text))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1"  # the README's exit code of a failure at run time
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: could not write") and f"{tmp_path / names}" in line and "File too large" in line
    assert f"hydra.run.dir={tmp_path} resume=auto" in line


def test_a_run_directory_that_refuses_new_files_is_one_error_line(tmp_path):
    """Today creating tb/ (or metrics.jsonl) in a read-only run directory went up as a traceback."""
    from test_checkpoint import _unwritable

    run = tmp_path / "run"
    run.mkdir()
    with _unwritable(run):
        proc = _child(
            """
            import sys
            from res2net.engine.metrics import MetricsWriter
            from res2net.errors import exit_code, report
            try:
                MetricsWriter(sys.argv[1], enabled=True)
            except Exception as err:
                print(exit_code(err))
                report(err)
            """,
            str(run),
        )
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stdout + proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: could not create {run / 'tb'}: "), line
