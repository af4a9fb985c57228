"""Offline is fast (issue 21, item 8): with no way to reach any weight source, fetching released weights fails in
seconds per source with one line naming every source tried and the ways to work offline. The sources are local
ports: one that refuses connections, one that accepts them and never answers."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from res2net.models.hub import released_weights

REPO = Path(__file__).resolve().parents[2]
NAME = "res2net50_26w_4s"


@contextlib.contextmanager
def _refusing_port():
    """The URL of a port on 127.0.0.1 that nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _silent_port():
    """The URL of a port on 127.0.0.1 that accepts connections (the kernel completes them into the backlog) and
    never answers: what a black-holing proxy or a hung server does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _fetch_in_thread(limit: float) -> tuple[BaseException | None, float]:
    """(the error released_weights raised, seconds it took); fails the test when it has not returned after ``limit``
    seconds (a download without a timeout hangs forever: it is left behind in a daemon thread)."""
    result: dict = {}

    def run():
        start = time.monotonic()
        try:
            released_weights(NAME)
        except BaseException as err:  # noqa: BLE001  (whatever it raised is what the test checks)
            result["error"] = err
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"released_weights still waiting after {limit} s"
    return result.get("error"), result["seconds"]


def _assert_one_line_naming(message: str, *sources: str) -> None:
    assert "\n" not in message, message
    assert f"could not fetch the released weights of {NAME}, tried: " in message
    for source in sources:
        assert source in message, message
    for switch in ("HF_HUB_OFFLINE=1", "RES2NET_MIRRORS=", "HF_ENDPOINT", "local file"):
        assert switch in message, message


def test_refused_connections_fail_in_seconds_with_one_line(tmp_path, monkeypatch, caplog):
    """Today: ~25 s (huggingface_hub's 5 retries of the hub, a warning each, 12 warnings in all) and a 7-line
    error without the offline switches."""
    monkeypatch.setenv("RES2NET_CACHE", str(tmp_path / "cache"))
    with _refusing_port() as mirror, _refusing_port() as hub:
        monkeypatch.setenv("RES2NET_MIRRORS", mirror)
        monkeypatch.setenv("HF_ENDPOINT", hub)
        error, seconds = _fetch_in_thread(120)
    assert isinstance(error, RuntimeError), error
    assert seconds < 5, f"took {seconds:.1f} s"
    _assert_one_line_naming(str(error), f"{mirror}/{NAME}-06e79181.pth", f"Hugging Face hub {hub}/timm/{NAME}.in1k")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


def test_a_source_that_never_answers_fails_after_the_timeout(tmp_path, monkeypatch):
    """Today torch.hub's download waited forever on a connection that never answered (urlopen without a timeout)."""
    monkeypatch.setenv("RES2NET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RES2NET_DOWNLOAD_TIMEOUT", "1")
    with _silent_port() as mirror, _silent_port() as hub:
        monkeypatch.setenv("RES2NET_MIRRORS", mirror)
        monkeypatch.setenv("HF_ENDPOINT", hub)
        error, seconds = _fetch_in_thread(60)
    assert isinstance(error, RuntimeError), error
    assert seconds < 8, f"took {seconds:.1f} s for two sources with a 1 s timeout"
    _assert_one_line_naming(str(error), f"{mirror}/{NAME}-06e79181.pth", f"no answer from {hub} within 1 s")
    assert "timed out" in str(error)


@pytest.mark.slow
@pytest.mark.parametrize("offline", [False, True])
def test_evaluate_py_without_network_ends_in_one_error_line(tmp_path, noise_root, offline):
    """evaluate.py checkpoint=released with the hub pointed at a refusing local port (or HF_HUB_OFFLINE=1 and the
    hub pointed at a port that never answers: the hub cache alone is asked). Today: 12 hub warnings, a 7-line
    error."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RES2NET_CACHE=str(tmp_path / "cache"))
    with _refusing_port() as mirror, _silent_port() if offline else _refusing_port() as hub:
        env.update(RES2NET_MIRRORS=mirror, HF_ENDPOINT=hub, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "evaluate.py"),
                f"model.name={NAME}",
                "checkpoint=released",
                "data=folder",
                f"data.root={noise_root}",
                "data.img_size=32",
                "data.num_workers=0",
                "progress=false",
                f"hydra.run.dir={tmp_path / 'eval'}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Retry" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    _assert_one_line_naming(line, f"{mirror}/{NAME}-06e79181.pth", f"Hugging Face hub {hub}/timm/{NAME}.in1k")
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
