"""The `make demo` path: the digits data set, the demo experiment config, and a shortened real run of scripts/demo.py
(real train.py, data pipeline, checkpoints, TensorBoard events, evaluate.py) that clearly beats chance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.datasets import load_digits

import res2net
from res2net.config import register_configs
from res2net.data.demo import MANIFEST, make_demo_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo"])
    assert cfg.model.name == "res2net50_26w_4s" and list(cfg.model.layers) == [1, 1, 1, 1]
    assert cfg.data.backend == "torchvision" and cfg.data.root == "data/demo" and cfg.data.img_size == 32
    assert list(cfg.data.train_crop_scale) == [0.6, 1.0] and cfg.data.hflip == 0.0
    assert cfg.schedule.name.value == "cosine" and cfg.schedule.epochs == 15 and cfg.schedule.warmup_epochs == 3
    assert cfg.optim.lr * 64 / cfg.optim.base_batch == pytest.approx(0.1)  # lr 0.1 at batch 64
    model = res2net.create_model(
        cfg.model.name, num_classes=10, layers=cfg.model.layers, base_width=cfg.model.base_width, scale=cfg.model.scale
    )
    assert sum(p.numel() for p in model.parameters()) < 5e6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_demo_dataset_stratified_and_idempotent(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", per_class=10)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["counts"] == {"train": 80, "val": 20}
    for digit in range(10):  # every class in both splits, 1 in 5 to val
        assert len(list((root / "val" / str(digit)).glob("*.jpg"))) == 2
        assert len(list((root / "train" / str(digit)).glob("*.jpg"))) == 8
    image = Image.open(next((root / "val" / "3").glob("*.jpg")))
    assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).max() > 128  # ink is bright on a dark ground

    stamp = (root / MANIFEST).stat().st_mtime_ns
    make_demo_dataset(tmp_path / "demo", per_class=10)  # same parameters: untouched
    assert (root / MANIFEST).stat().st_mtime_ns == stamp
    make_demo_dataset(tmp_path / "demo", per_class=10, size=48)  # other parameters: rebuilt in place
    assert Image.open(next((root / "val" / "3").glob("*.jpg"))).size == (48, 48)
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no staging folder left behind

    with pytest.raises(ValueError, match="size=4"):
        make_demo_dataset(tmp_path / "other", size=4)


def test_full_demo_split_is_stratified(tmp_path):
    targets = load_digits().target
    root = make_demo_dataset(tmp_path / "demo")
    counts = json.loads((root / MANIFEST).read_text())["counts"]
    assert counts["train"] + counts["val"] == 1797
    for digit in range(10):
        n = int((targets == digit).sum())
        assert len(list((root / "val" / str(digit)).glob("*.jpg"))) == -(-n // 5)


def test_short_demo_run_beats_chance(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/demo.py",
            "--data",
            str(tmp_path / "digits"),
            "--run-dir",
            str(run_dir),
            "--per-class",
            "100",
            "--min-top1",
            "50",
            "schedule.epochs=4",
            "schedule.warmup_epochs=1",
            "data.batch_size=32",
            "optim.base_batch=32",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["count"] == 200 and results["top1"] >= 50.0  # chance is 10%
    assert f"val top-1 {results['top1']:.2f}%" in proc.stdout and str(run_dir) in proc.stdout
    assert (run_dir / "checkpoints" / "best.pth").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert list(run_dir.rglob("events.out.tfevents.*"))
    # evaluate.py reproduces the trainer's own validation of the best checkpoint
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(e["val_top1"] for e in epochs if e["kind"] == "epoch")
    assert results["top1"] == pytest.approx(best, abs=0.5 + 1e-9)  # BN folding may flip one borderline image
