"""evaluate.py end to end on real JPEGs: results.json / predictions.csv, and a real 2-process torchrun run that
counts each of 101 images once and matches world size 1 exactly, with both backends (torchvision and DALI on CPU);
ReaL labels against a hand count at world size 1 and 2."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_set_helpers import tiny_1k_checkpoint, write_imagenet_val
from PIL import Image

import res2net

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 101  # prime: shards of 51 + 50, uneven batches
CLASSES = ("ant", "bee", "cat")
TINY = {"name": "res2net50_26w_4s", "num_classes": None, "layers": [1, 1, 1, 1], "base_width": 4, "scale": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """<root>/val/<class>/*.jpg: 101 real JPEGs (32-48 px, random colour blobs) over 3 classes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        cls = CLASSES[i % len(CLASSES)]
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(32, 49, size=2)
        pixels = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((int(w), int(h)), Image.BILINEAR).save(root / "val" / cls / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A train.py-style checkpoint of a reduced model (3 classes) with its model config and EMA weights."""
    torch.manual_seed(0)
    model = res2net.create_model(TINY["name"], num_classes=3, layers=TINY["layers"], base_width=4)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["fc.bias"] += torch.tensor([10.0, 0.0, 0.0])  # the EMA weights always predict class 0
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    torch.save({"model": model.state_dict(), "ema": ema, "config": {"model": TINY}, "epoch": 3}, path)
    return path


def _evaluate(out_dir, folder, checkpoint, *overrides, nproc=1):
    launcher = (
        [sys.executable, "evaluate.py"]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "evaluate.py"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *launcher,
            f"checkpoint={checkpoint}",
            "data=folder",
            f"data.root={folder}",
            "data.img_size=32",
            "data.batch_size=16",
            "data.num_workers=1",
            "progress=false",
            f"hydra.run.dir={out_dir}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(out_dir) / "results.json").read_text()), proc


def _predictions(out_dir):
    with open(Path(out_dir) / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_results_json_and_predictions_csv(tmp_path, folder, checkpoint):
    out, proc = _evaluate(tmp_path / "run", folder, checkpoint, "save_predictions=true", "data.backend=torchvision")
    assert out["count"] == NUM_IMAGES and out["world_size"] == 1
    for key in ("top1", "top5", "loss", "img_per_s"):
        assert isinstance(out[key], float)
    assert out["top5"] == 100.0  # 3 classes
    assert set(out["per_class_accuracy"]) == set(CLASSES)
    assert out["per_class_count"] == {"ant": 34, "bee": 34, "cat": 33}
    correct = sum(out["per_class_accuracy"][c] * out["per_class_count"][c] / 100 for c in CLASSES)
    assert correct == pytest.approx(out["top1"] * NUM_IMAGES / 100)
    assert out["checkpoint_sha256"] == res2net.models.download.sha256_file(checkpoint)
    assert out["config"]["model"]["num_classes"] == 3  # read from the checkpoint's classifier
    assert out["config"]["data"]["img_size"] == 32 and out["config"]["fold_bn"] is True
    assert out["published"] is None
    assert "top-1" in proc.stderr + proc.stdout
    rows = _predictions(tmp_path / "run")
    assert len(rows) == NUM_IMAGES
    assert list(rows[0]) == [
        "path",
        "target",
        "top1",
        "top2",
        "top3",
        "top4",
        "top5",
        "prob1",
        "prob2",
        "prob3",
        "prob4",
        "prob5",
        "target_name",
        "name1",
        "name2",
        "name3",
        "name4",
        "name5",
    ]
    # The hand-made checkpoint stores no class names: its outputs are named by their indices.
    assert all(r["target_name"] == r["target"] and r["name1"] == r["top1"] for r in rows)
    assert rows[0]["path"].endswith("val/ant/000.jpg") and rows[-1]["path"].endswith("val/cat/098.jpg")
    assert rows[-1]["top4"] == ""  # only 3 classes: fewer than 5 predictions per image
    top1_hits = sum(int(r["top1"]) == int(r["target"]) for r in rows)
    assert 100.0 * top1_hits / NUM_IMAGES == pytest.approx(out["top1"])


def test_use_ema_and_published_line(tmp_path, folder, checkpoint):
    out, _ = _evaluate(tmp_path / "ema", folder, checkpoint, "use_ema=true", "data.backend=torchvision")
    assert out["per_class_accuracy"] == {"ant": 100.0, "bee": 0.0, "cat": 0.0}
    # a checkpoint under a released file's name is compared with that release's published numbers
    released = tmp_path / res2net.models.variants.RELEASED["res2net50_26w_4s"].file
    released.write_bytes(checkpoint.read_bytes())
    out, proc = _evaluate(tmp_path / "pub", folder, released, "data.backend=torchvision")
    assert out["published"]["top1"] == pytest.approx(77.994)
    assert out["published"]["delta_top1"] == pytest.approx(out["top1"] - 77.994)
    assert "top-1 published 77.994 measured" in proc.stderr + proc.stdout


def test_bad_checkpoint_path_is_a_clear_error(tmp_path, folder):
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            f"checkpoint={tmp_path}/nope.pth",
            "data=folder",
            f"data.root={folder}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "nope.pth" in proc.stderr and "checkpoint=released" in proc.stderr
    # a misspelt key fails at composition, before any data is read
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "chekpoint=released", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "chekpoint" in proc.stderr


@pytest.mark.parametrize(
    "content",
    [b"this is not an ONNX model\n", np.random.default_rng(7).bytes(4096), None],
    ids=["text", "random-bytes", "missing"],
)
def test_a_bad_onnx_file_is_one_line_in_evaluate_and_predict(tmp_path, folder, content):
    """The checkpoint's recipe is read from the ONNX file before ONNX Runtime opens it: a garbage or missing .onnx
    is one error line there too, in evaluate.py and scripts/predict.py (a garbage file was a protobuf traceback)."""
    onnx_file = tmp_path / "model.onnx"
    if content is not None:
        onnx_file.write_bytes(content)
    image = next(Path(folder, "val").rglob("*.jpg"))
    commands = [
        [
            "evaluate.py",
            f"checkpoint={onnx_file}",
            "runtime=onnxruntime",
            "device=cpu",
            "data=folder",
            f"data.root={folder}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        ["scripts/predict.py", str(onnx_file), str(image)],
    ]
    for command in commands:
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (command[0], proc.stderr[-2000:])
        assert lines[-1].startswith(("error:", "predict.py: error:")) and str(onnx_file) in lines[-1], lines[-3:]
        assert ("not found" if content is None else "is not an ONNX model") in lines[-1]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_torchrun_two_processes_equal_world_size_one(tmp_path, folder, checkpoint, backend):
    one, _ = _evaluate(tmp_path / "ws1", folder, checkpoint, f"data.backend={backend}", "save_predictions=true")
    two, _ = _evaluate(
        tmp_path / "ws2", folder, checkpoint, f"data.backend={backend}", "save_predictions=true", nproc=2
    )
    assert one["count"] == two["count"] == NUM_IMAGES and two["world_size"] == 2
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])
    assert two["per_class_count"] == one["per_class_count"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    p1, p2 = _predictions(tmp_path / "ws1"), _predictions(tmp_path / "ws2")
    assert [r["path"] for r in p2] == [r["path"] for r in p1]  # each image once, in global order
    assert [[r[f"top{k}"] for k in (1, 2, 3)] for r in p2] == [[r[f"top{k}"] for k in (1, 2, 3)] for r in p1]
    for r1, r2 in zip(p1, p2):
        assert float(r2["prob1"]) == pytest.approx(float(r1["prob1"]), abs=1e-5)
    assert not any(Path(tmp_path).glob("ws2/*/results.json"))  # one output directory for both ranks


@pytest.fixture(scope="module")
def val_1k(tmp_path_factory):
    """A 1,000-class checkpoint and <root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG: 15 photographs in 3 classes."""
    root = tmp_path_factory.mktemp("val1k")
    write_imagenet_val(root, per_class=5)
    return root, tiny_1k_checkpoint(root / "tiny1k.pth")


def _real_by_hand(rows: list[dict], real: list[list[int]]) -> tuple[float, float, int]:
    hit1 = hit5 = count = 0
    for r in rows:
        labels = real[int(Path(r["path"]).name[len("ILSVRC2012_val_") :][:8]) - 1]
        if labels:
            count += 1
            hit1 += int(r["top1"]) in labels
            hit5 += any(int(r[f"top{k}"]) in labels for k in range(1, 6))
    return 100 * hit1 / count, 100 * hit5 / count, count


def test_real_labels_against_a_hand_count_at_world_size_1_and_2(tmp_path, val_1k):
    root, ckpt = val_1k
    plain, _ = _evaluate(tmp_path / "plain", root, ckpt, "save_predictions=true", "data.backend=torchvision")
    assert "real_top1" not in plain
    rows = _predictions(tmp_path / "plain")
    # ReaL lists in file-name order: empty, the predicted class alone, it second of two, two others, ...
    real = []
    for i, r in enumerate(sorted(rows, key=lambda r: Path(r["path"]).name)):
        top1 = int(r["top1"])
        real.append([[], [top1], [(top1 + 1) % 1000, top1], [(top1 + 1) % 1000, (top1 + 2) % 1000]][i % 4])
    (tmp_path / "real.json").write_text(json.dumps(real + [[5]]))  # one list more: a shorter folder than val
    top1, top5, count = _real_by_hand(rows, real)
    assert count == 11 and 0 < top1 < 100
    for nproc in (1, 2):
        out, proc = _evaluate(
            tmp_path / f"ws{nproc}",
            root,
            ckpt,
            f"real_labels={tmp_path / 'real.json'}",
            "data.backend=torchvision",
            nproc=nproc,
        )
        assert out["world_size"] == nproc and out["count"] == 15 and out["real_count"] == count
        assert out["real_top1"] == pytest.approx(top1) and out["real_top5"] == pytest.approx(top5)
        assert "ReaL: top-1" in proc.stderr + proc.stdout
        for key in ("ece", "nll", "param_count"):
            assert key in out
