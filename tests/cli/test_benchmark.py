"""scripts/benchmark.py on a reduced model for two iterations: the table and the JSON have the right rows.

No timing is asserted: speed is measured by running the script on a quiet machine, not in tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--base-width",
    "4",
    "--layers",
    "1",
    "1",
    "1",
    "1",
    "--num-classes",
    "10",
    "--img-size",
    "32",
    "--batch-size",
    "2",
    "--warmup",
    "1",
    "--iters",
    "2",
    "--rounds",
    "2",
    "--threads",
    "1",
]


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_table_and_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = _run(*TINY, "--precision", "bf16", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = [(r["mode"], r["path"]) for r in report["rows"]]
    assert rows == [
        ("inference", "eager fp32 NCHW (baseline)"),
        ("inference", "folded BN + channels_last"),
        ("inference", "folded BN + channels_last + bf16"),
        ("train", "eager fp32 NCHW (baseline)"),
        ("train", "channels_last"),
        ("train", "channels_last + bf16"),
    ]
    for r in report["rows"]:
        assert r["img_per_s"] > 0 and r["ms_per_batch"] > 0
        assert r["img_per_s"] == pytest.approx(2 / (r["ms_per_batch"] / 1000), rel=1e-6)
    assert [r["speedup"] for r in report["rows"] if "baseline" in r["path"]] == [1.0, 1.0]
    # the script re-executed itself with the allocator settings DESIGN.md asks for
    assert report["environment"]["allocator_env"] == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    assert report["environment"]["torch_threads"] == 1
    table = proc.stdout
    assert "| inference | folded BN + channels_last + bf16 |" in table
    assert "| train | channels_last + bf16 |" in table


def test_modes_subset_and_clear_errors():
    proc = _run(*TINY, "--modes", "inference", "--precision", "fp32", "--keep-allocator")
    assert proc.returncode == 0, proc.stderr
    assert "| inference |" in proc.stdout and "| train |" not in proc.stdout
    assert "| inference | folded BN + channels_last |" in proc.stdout and "bf16" not in proc.stdout
    proc = _run(*TINY, "--precision", "fp16", "--keep-allocator")
    assert proc.returncode != 0 and "fp16 is for GPUs" in proc.stderr
    proc = _run(*TINY, "--model", "resnet50", "--keep-allocator")
    assert proc.returncode != 0 and "res2net50_26w_4s" in proc.stderr  # names the valid choices


def test_onnxruntime_and_timm_rows_beside_the_baseline(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        *TINY,
        "--iters",
        "1",
        "--rounds",
        "1",
        "--modes",
        "inference",
        "--precision",
        "fp32",
        "--backends",
        "torch,onnxruntime,timm",
        "--ort-optimizations",
        "all,basic",
        "--json",
        str(out),
        "--keep-allocator",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {r["path"]: r for r in report["rows"]}
    assert list(rows) == [
        "eager fp32 NCHW (baseline)",
        "timm eager fp32 NCHW",
        "folded BN + channels_last",
        "ONNX Runtime, our export (BN folded), all",
        "ONNX Runtime, our export (BN folded), basic",
        "ONNX Runtime, our export, int8 (QDQ, per-channel weights), all",
        "ONNX Runtime, our export, int8 (QDQ, per-channel weights), basic",
        "ONNX Runtime, timm's export (timm.utils.onnx), all",
        "ONNX Runtime, timm's export (timm.utils.onnx), basic",
    ]
    assert rows["timm eager fp32 NCHW"]["vs_timm"] == 1.0
    for r in rows.values():
        assert r["vs_timm"] == pytest.approx(r["img_per_s"] / rows["timm eager fp32 NCHW"]["img_per_s"])
    assert report["environment"]["cpu_capability"] and report["environment"]["onnxruntime"]
    assert (
        "| vs timm eager |" in proc.stdout.splitlines()[1]
        and f"({report['environment']['cpu_capability']})" in proc.stdout.splitlines()[0]
    )
    flags = report["environment"]["cpu_int8_flags"]  # the header says whether int8 has its units here
    assert ("CPU int8 units: " + ", ".join(flags) if flags else "int8 may not pay") in proc.stdout.splitlines()[0]


def test_unknown_backend_is_refused():
    proc = _run(*TINY, "--backends", "torch,tensorrt", "--keep-allocator")
    assert proc.returncode == 2 and "torch, onnxruntime, timm" in proc.stderr
