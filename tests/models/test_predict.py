"""The checkpoint carries its recipe: a 64 px checkpoint evaluated, exported and predicted at 64 px without any
data.* override; prediction equal to evaluate.py save_predictions=true (PyTorch and ONNX); class names round-trip
through checkpoint, results.json, predictions.csv, exports and prediction."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from res2net.data.classes import imagenet_class_names
from res2net.data.preprocess import Preprocessing
from res2net.engine.recipe import onnx_record
from res2net.predictor import Predictor, expand_inputs

REPO = Path(__file__).resolve().parents[2]
NAMES = ["tench", "goldfish", "great white shark"]  # the image_folder fixture's wnids, read as ImageNet names
RECIPE = Preprocessing(64, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)  # the one-line error reports are part of what is tested
    return env


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO
    )


@pytest.fixture(scope="module")
def run64(tmp_path_factory, image_folder) -> Path:
    """A train.py run at 64 px, crop 1.0, bicubic, its own mean / std: nothing evaluation's defaults would guess."""
    run = tmp_path_factory.mktemp("run64")
    proc = _run(
        "train.py",
        f"hydra.run.dir={run}",
        "data=folder",
        f"data.root={image_folder}",
        "data.img_size=64",
        "data.crop_pct=1.0",
        "data.interpolation=bicubic",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.base_width=4",
        "model.layers=[1,1,1,1]",
        "schedule.epochs=1",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run


def _evaluate(out: Path, checkpoint: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        "evaluate.py",
        f"checkpoint={checkpoint}",
        "data=folder",  # data.root only: no data.img_size / crop_pct / interpolation / mean / std
        f"data.root={root}",
        "data.num_workers=0",
        "save_predictions=true",
        "progress=false",
        f"hydra.run.dir={out}",
        *extra,
    )


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_predictions(rows: list[dict], predictor: Predictor) -> None:
    predictions = list(predictor.predict([r["path"] for r in rows], topk=3, batch_size=7))
    assert [p.path for p in predictions] == [r["path"] for r in rows]
    for row, p in zip(rows, predictions):
        assert list(p.indices) == [int(row[f"top{k}"]) for k in (1, 2, 3)], row["path"]
        assert list(p.probs) == pytest.approx([float(row[f"prob{k}"]) for k in (1, 2, 3)], abs=2e-6)
        assert list(p.names) == [row[f"name{k}"] for k in (1, 2, 3)]


def test_checkpoint_recipe_in_evaluation_and_prediction(tmp_path, run64, image_folder):
    checkpoint = run64 / "checkpoints" / "last.pth"
    assert torch.load(checkpoint, weights_only=True)["classes"] == ["n01440764", "n01443537", "n01484850"]
    proc = _evaluate(tmp_path / "eval", checkpoint, image_folder)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    data = results["config"]["data"]
    assert (data["img_size"], data["crop_pct"], data["interpolation"], data["mean"]) == (64, 1.0, "bicubic", [0.5] * 3)
    assert results["class_names"] == NAMES
    rows = _csv(tmp_path / "eval" / "predictions.csv")
    assert len(rows) == 20 and {r["target_name"] for r in rows} == set(NAMES)
    predictor = Predictor(checkpoint)
    assert predictor.preprocessing == RECIPE and predictor.class_names == NAMES
    _assert_same_predictions(rows, predictor)
    # A value typed on the command line still wins.
    proc = _evaluate(tmp_path / "eval48", checkpoint, image_folder, "data.img_size=48")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((tmp_path / "eval48" / "results.json").read_text())["config"]["data"]["img_size"] == 48


def test_onnx_and_hf_exports_carry_the_recipe(tmp_path, run64, image_folder):
    checkpoint = run64 / "checkpoints" / "last.pth"
    onnx_file = tmp_path / "model.onnx"
    proc = _run("scripts/export.py", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(onnx_file))
    assert proc.returncode == 0, proc.stdout[-3000:]  # no --model, no --img-size: the checkpoint says both
    record = onnx_record(onnx_file)
    assert Preprocessing.from_dict(record["preprocessing"]) == RECIPE and record["classes"] == NAMES
    onnx_predictor = Predictor(onnx_file)
    assert onnx_predictor.net.input_shape == (3, 64, 64) and onnx_predictor.class_names == NAMES
    proc = _evaluate(tmp_path / "eval_onnx", onnx_file, image_folder, "runtime=onnxruntime", "device=cpu", "amp=off")
    assert proc.returncode == 0, proc.stdout[-3000:]
    _assert_same_predictions(_csv(tmp_path / "eval_onnx" / "predictions.csv"), onnx_predictor)
    # Evaluated at another size: one error line (a usage error: exit 2), no traceback.
    proc = _evaluate(tmp_path / "eval_bad", onnx_file, image_folder, "runtime=onnxruntime", "data.img_size=32")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert "takes 3x64x64 (C x H x W) images, got 3x32x32" in proc.stdout.strip().splitlines()[-1]
    # The HF folder at another size on purpose, read back by the predictor.
    folder = tmp_path / "hf"
    cmd = ["scripts/export.py", "--checkpoint", str(checkpoint), "--format", "hf", "--out", str(folder)]
    proc = _run(*cmd, "--img-size", "96")
    assert proc.returncode == 0, proc.stdout[-3000:]
    config = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert config["input_size"] == [3, 96, 96] and config["interpolation"] == "bicubic"
    assert config["label_names"] == NAMES
    hf = Predictor(folder)
    assert hf.preprocessing == RECIPE.overridden(img_size=96) and hf.class_names == NAMES


def test_predict_script_writes_csv_and_json(tmp_path, run64, image_folder):
    files = expand_inputs([str(image_folder / "val")])
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    proc = _run(
        "scripts/predict.py",
        str(run64 / "checkpoints" / "last.pth"),
        str(image_folder / "val" / "n01440764"),
        str(image_folder / "val" / "n0144*" / "*.JPEG"),
        "--topk",
        "2",
        "--csv",
        str(out_csv),
        "--json",
        str(out_json),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    listed = json.loads(out_json.read_text())
    assert len(listed) == sum(1 for f in files if "n01440764" in f) + sum(1 for f in files if "/n0144" in f)
    assert all(set(p["names"]) <= set(NAMES) and len(p["probs"]) == 2 for p in listed)
    assert len(_csv(out_csv)) == 2 * len(listed)
    assert f"{listed[0]['path']}: {listed[0]['names'][0]} " in proc.stdout
    missing = _run("scripts/predict.py", str(run64 / "checkpoints" / "last.pth"), str(tmp_path / "nothing"))
    assert missing.returncode == 1 and missing.stdout.strip().splitlines()[-1].startswith("error:")


def test_imagenet_names_are_shipped():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"] and names[-1] == "toilet tissue"
