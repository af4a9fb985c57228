"""scripts/eval_suite.py (`make eval-suite`) on a folder holding some of the sets: skip lines, one CSV in timm's
columns, published numbers beside ours and the exit status; scripts/summarize_evals.py over a real evaluate.py
resolution / crop sweep."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_set_helpers import SUBSET, tiny_1k_checkpoint, write_class_folders, write_imagenet_val
from PIL import Image

import res2net
from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS

REPO = Path(__file__).resolve().parents[2]
SUITE, SUMMARIZE = REPO / "scripts" / "eval_suite.py", REPO / "scripts" / "summarize_evals.py"
TIMM_COLUMNS = ["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct", "interpolation"]
TINY_ARGS = ["data.img_size=32", "data.batch_size=8", "data.num_workers=0", "progress=false", "device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """ImageNet val (15 images) with real.json, V2 matched-frequency and -R; no Sketch, -A or other V2 variants."""
    root = tmp_path_factory.mktemp("roots")
    write_imagenet_val(root / "imagenet", per_class=5)
    (root / "real.json").write_text(json.dumps([[] if i % 5 == 0 else [i % 1000] for i in range(15)]))
    write_class_folders(root / "imagenetv2-matched-frequency-format-val", ["1", "500"], 3, seed=7, suffix=".jpeg")
    write_class_folders(root / "imagenet-r", [IMAGENET1K_WNIDS[i] for i in SUBSET], 2, seed=8)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_1k_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _suite(out_dir, checkpoint, roots, *args):
    return subprocess.run(
        [
            sys.executable,
            str(SUITE),
            "--checkpoint",
            str(checkpoint),
            "--roots",
            str(roots),
            "--out-dir",
            str(out_dir),
            *args,
            *TINY_ARGS,
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_suite_csv_skip_lines_and_published_numbers(tmp_path, roots, checkpoint):
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"res2net50_26w_4s": {"imagenet_r": 50.0, "real": 10.0}}))
    proc = _suite(tmp_path / "own", checkpoint, roots, "--published", str(published))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # not released: nothing to fail
    for absent in ("imagenet_sketch", "imagenet_a", "imagenet_v2-threshold-0.7", "imagenet_v2-top-images"):
        assert f"skipping {absent}: " in proc.stdout
    assert "skipping imagenet_r" not in proc.stdout and "skipping real" not in proc.stdout

    with open(tmp_path / "own" / "suite.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dataset", *TIMM_COLUMNS, "ece"]
    assert [r["dataset"] for r in rows] == ["imagenet", "real", "imagenet_v2-matched-frequency", "imagenet_r"]
    params = sum(
        p.numel() for p in res2net.create_model("res2net50_26w_4s", layers=[1, 1, 1, 1], base_width=4).parameters()
    )
    for r in rows:
        result = json.loads(
            (tmp_path / "own" / ("imagenet" if r["dataset"] == "real" else r["dataset"]) / "results.json").read_text()
        )
        top1, top5 = (
            (result["real_top1"], result["real_top5"]) if r["dataset"] == "real" else (result["top1"], result["top5"])
        )
        assert float(r["top1"]) == pytest.approx(top1, abs=5e-4) and float(r["top5"]) == pytest.approx(top5, abs=5e-4)
        assert float(r["top1_err"]) == pytest.approx(100 - float(r["top1"]), abs=1e-3)
        assert float(r["top5_err"]) == pytest.approx(100 - float(r["top5"]), abs=1e-3)
        assert r["model"] == "res2net50_26w_4s" and r["img_size"] == "32" and r["crop_pct"] == "0.875"
        assert r["interpolation"] == "bilinear" and float(r["param_count"]) == pytest.approx(params / 1e6, abs=0.01)
        assert (r["ece"] == "") == (r["dataset"] == "real")
    counts = {"imagenet": 15, "real": 12, "imagenet_v2-matched-frequency": 6, "imagenet_r": 6}
    table = (tmp_path / "own" / "suite.md").read_text()
    for name, n in counts.items():
        assert f"| {name} | {n} |" in table
    assert "| 50.00 |" in table and "unchecked" in table  # published beside ours, not judged: not a released file


def test_released_checkpoint_missing_its_published_number_fails(tmp_path, roots, checkpoint):
    # A copy under a released file's name is that release: ImageNet val is judged against its 77.994
    released = tmp_path / res2net.models.variants.RELEASED["res2net50_26w_4s"].file
    released.write_bytes(checkpoint.read_bytes())
    first = _suite(tmp_path / "first", released, roots, "--tolerance", "1000")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    measured_r = json.loads((tmp_path / "first" / "imagenet_r" / "results.json").read_text())["top1"]
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"res2net50_26w_4s": {"imagenet_r": measured_r}}))
    proc = _suite(tmp_path / "second", released, roots, "--published", str(published))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    fail = next(line for line in proc.stderr.splitlines() if line.startswith("FAIL:"))
    assert fail.endswith("on: imagenet (-77.99, tolerance 0.1)")  # -R met its (test) published number
    table = (tmp_path / "second" / "suite.md").read_text()
    assert "| 77.99 |" in table and "| FAIL |" in table and "| ok |" in table


def test_suite_usage_errors(tmp_path, checkpoint):
    proc = _suite(tmp_path / "out", checkpoint, tmp_path / "nowhere")
    assert proc.returncode == 2 and "--roots" in proc.stderr and "nowhere" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _suite(tmp_path / "out", checkpoint, tmp_path / "empty")
    assert proc.returncode == 2 and "no evaluation set under" in proc.stderr
    assert "skipping imagenet_a" in proc.stdout
    proc = _suite(tmp_path / "out", "res2net_nope", tmp_path / "empty")
    assert proc.returncode == 2 and "neither a model name" in proc.stderr


def test_summarize_a_resolution_and_crop_sweep(tmp_path, roots, checkpoint):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "-m",
            f"checkpoint={checkpoint}",
            "data=imagenet_r",
            f"data.root={roots}",
            "data.img_size=32,48",
            "data.crop_pct=0.875,1.0",
            "data.batch_size=8",
            "data.num_workers=0",
            "progress=false",
            "device=cpu",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert len(results) == 4
    proc = subprocess.run(
        [sys.executable, str(SUMMARIZE), str(sweep), "--out-dir", str(tmp_path / "sum")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "sum" / "evals.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["img_size"]), float(r["crop_pct"])) for r in rows] == [
        (32, 0.875),
        (48, 0.875),
        (32, 1.0),
        (48, 1.0),
    ]
    for r in rows:
        out = results[r["run"]]
        assert (out["config"]["data"]["img_size"], out["config"]["data"]["crop_pct"]) == (
            int(r["img_size"]),
            float(r["crop_pct"]),
        )
        assert float(r["top1"]) == pytest.approx(out["top1"]) and float(r["ece"]) == pytest.approx(out["ece"])
        assert r["dataset"] == "imagenet_r" and r["count"] == "6"
    md = (tmp_path / "sum" / "evals.md").read_text()
    assert "| img_size | crop 0.875 | crop 1.0 |" in md
    top1 = {(int(r["img_size"]), float(r["crop_pct"])): float(r["top1"]) for r in rows}
    assert f"| 48 | {top1[48, 0.875]:.3f} | {top1[48, 1.0]:.3f} |" in md
    with Image.open(tmp_path / "sum" / "evals.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    empty = subprocess.run(
        [sys.executable, str(SUMMARIZE), str(tmp_path / "sum")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 2 and "no results.json under" in empty.stderr
