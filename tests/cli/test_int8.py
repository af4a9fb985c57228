"""scripts/export.py --quantize int8: a model trained here on the demo digits (real train.py) quantised with
calibration from its training folder keeps its accuracy, records how it was made, runs at any batch size and under
evaluate.py runtime=onnxruntime with torchrun; bad calibration folders and an accuracy drop over --max-drop are one
error line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

import res2net
from res2net.data import build_loader
from res2net.data.demo import make_demo_dataset
from res2net.engine.eval_loop import evaluate
from res2net.export import (
    CALIBRATION_IMAGES,
    CALIBRATION_METHOD,
    OnnxRuntimeModel,
    calibration_files,
    checkpoint_eval_data,
    onnx_metadata,
)
from scripts import export as export_script

ROOT = Path(__file__).resolve().parents[2]

NAME = "res2net50_26w_4s"
DIGITS_VAL = 364  # 1 in 5 of each digit of scikit-learn's 1,797
CHECK_LINE = re.compile(
    r"check on .* \((\d+) images\): float32 top-1 ([\d.]+) top-5 ([\d.]+) \| int8 top-1 ([\d.]+) top-5 ([\d.]+) \| "
    r"top-1 agreement ([\d.]+)% \| top-1 drop (-?[\d.]+) points"
)


def _export(*args: str) -> tuple[int, str, str]:
    """scripts/export.py's main in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = export_script.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """(best.pth, data root): the demo digits at 32 px and a reduced Res2Net trained on them by the real train.py
    (experiment=demo, 10 of its 15 epochs: about 2 minutes on 2 free cores)."""
    work = tmp_path_factory.mktemp("digits")
    root = make_demo_dataset(work / "digits")
    run_dir = work / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=demo",
            f"data.root={root}",
            "schedule.epochs=10",
            "schedule.warmup_epochs=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "checkpoints" / "best.pth", root


@pytest.fixture(scope="module")
def quantized(digits_run, tmp_path_factory):
    """(int8 file, the export's printed check as numbers) for the digits model, checked on its val split."""
    checkpoint, root = digits_run
    out = tmp_path_factory.mktemp("int8") / "digits.int8.onnx"
    code, stdout, stderr = _export(
        *("--model", NAME, "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)),
        *("--quantize", "int8", "--calibration", str(root / "train"), "--check-root", str(root)),
    )
    assert code == 0, stdout + stderr
    count, f1, f5, q1, q5, agreement, drop = CHECK_LINE.search(stdout).groups()
    check = dict(count=int(count), float_top1=float(f1), float_top5=float(f5), int8_top1=float(q1))
    check.update(int8_top5=float(q5), agreement=float(agreement), drop=float(drop))
    return out, check, stdout


@pytest.mark.slow
def test_int8_keeps_the_digits_accuracy(digits_run, quantized):
    checkpoint, root = digits_run
    out, check, stdout = quantized
    assert check["count"] == DIGITS_VAL
    assert check["float_top1"] >= 90.0  # a trained model, so the comparison means something
    assert check["float_top1"] - check["int8_top1"] <= 1.0 and check["agreement"] >= 98.0
    assert check["drop"] == pytest.approx(check["float_top1"] - check["int8_top1"], abs=0.01)
    # The printed numbers are what the evaluation loop measures on the same images with the same preprocessing.
    data = checkpoint_eval_data(torch.load(checkpoint, weights_only=True))
    assert (data.img_size, data.crop_pct) == (32, 1.0)  # the demo's own, not the 224 px / 0.875 defaults
    val = build_loader({**vars(data), "root": str(root), "batch_size": 50}, "val")
    measured = evaluate(OnnxRuntimeModel(out, threads=1), val, device="cpu")
    assert measured["count"] == DIGITS_VAL
    assert measured["top1"] == pytest.approx(check["int8_top1"], abs=0.005)
    assert measured["top5"] == pytest.approx(check["int8_top5"], abs=0.005)
    assert f"{CALIBRATION_METHOD} calibration on {CALIBRATION_IMAGES} images of {root / 'train'} at 32 px" in stdout


@pytest.mark.slow
def test_int8_file_records_how_it_was_made_and_takes_any_batch(quantized):
    out, _, _ = quantized
    meta = onnx_metadata(out)
    assert meta["precision"] == "int8" and meta["calibration_method"] == CALIBRATION_METHOD
    assert meta["calibration_images"] == str(CALIBRATION_IMAGES)
    assert json.loads(meta["calibration_preprocessing"])["img_size"] == 32
    proto = onnx.load(out)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 20  # the convolution weights are stored as int8 ...
    per_channel = [
        node
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in {t.name for t in int8_weights}
    ]
    scales = {t.name: t for t in proto.graph.initializer}
    assert all(len(scales[node.input[1]].dims) == 1 for node in per_channel)  # ... with one scale per channel
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis stays symbolic
    runner = OnnxRuntimeModel(out, threads=1)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = runner(x)
    assert whole.shape == (7, 10)
    parts = [runner(part) for part in torch.split(x, [1, 2, 4])]
    assert [len(p) for p in parts] == [1, 2, 4]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-4)  # the same logits at any batch size


@pytest.mark.slow
def test_evaluate_runtime_onnxruntime_counts_the_int8_file_exactly_under_torchrun(digits_run, quantized, tmp_path):
    _, root = digits_run
    out, check, _ = quantized
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py"),
            *("runtime=onnxruntime", f"checkpoint={out}", f"model={NAME}", "device=cpu", "data=folder"),
            *(f"data.root={root}", "data.backend=torchvision", "data.img_size=32", "data.crop_pct=1.0"),
            *("data.batch_size=50", "data.num_workers=0", "progress=false", f"hydra.run.dir={tmp_path}"),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["count"] == DIGITS_VAL  # 182 + 182, each image once
    assert results["top1"] == pytest.approx(check["int8_top1"], abs=0.005)
    assert results["top5"] == pytest.approx(check["int8_top5"], abs=0.005)


@pytest.mark.slow
def test_a_drop_over_max_drop_is_exit_status_1(digits_run, quantized, tmp_path):
    """The same calibration gives the same file and the same drop: asked for less, the export fails by one line."""
    checkpoint, root = digits_run
    _, check, _ = quantized
    out = tmp_path / "strict.int8.onnx"
    limit = check["drop"] - 0.1
    code, stdout, stderr = _export(
        *("--model", NAME, "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)),
        *("--quantize", "int8", "--calibration", str(root / "train"), "--check-root", str(root)),
        *("--max-drop", f"{limit:.2f}"),
    )
    assert code == 1
    assert CHECK_LINE.search(stdout).group(7) == f"{check['drop']:.2f}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export.py: error: int8 top-1 is ") and "--max-drop" in lines[0]
    assert out.is_file()  # written, and the user is told so


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A train.py-style checkpoint of a reduced model (32 px preprocessing in its config), not trained."""
    torch.manual_seed(0)
    arch = dict(name=NAME, num_classes=10, layers=[1, 1, 1, 1], base_width=4)
    model = res2net.create_model(NAME, **{k: v for k, v in arch.items() if k != "name"})
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    config = {"model": arch, "data": {"img_size": 40, "val_img_size": 32, "crop_pct": 1.0}}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def test_checkpoint_eval_data_reads_the_saved_preprocessing(untrained):
    data = checkpoint_eval_data(torch.load(untrained, weights_only=True))
    assert (data.img_size, data.crop_pct, data.interpolation) == (32, 1.0, "bilinear")  # val_img_size wins
    released = checkpoint_eval_data({"conv1.weight": torch.zeros(1)})  # a plain state_dict: the published protocol
    assert (released.img_size, released.crop_pct, released.mean) == (224, 0.875, [0.485, 0.456, 0.406])


def test_calibration_files_are_spread_evenly_and_skip_hidden(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            (tmp_path / cls / f"{i}.jpg").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.jpg").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    picked = calibration_files(tmp_path, 4)
    assert [str(Path(p).relative_to(tmp_path)) for p in picked] == ["a/0.jpg", "a/6.jpg", "b/3.jpg", "b/9.jpg"]
    assert len(calibration_files(tmp_path, 100)) == 20  # all of them when the folder holds fewer


def test_bad_calibration_folders_are_one_error_line(untrained, noise_root, tmp_path):
    base = ("--model", NAME, "--checkpoint", str(untrained), "--format", "onnx", "--quantize", "int8")
    out = tmp_path / "m.int8.onnx"

    def one_error(calibration: Path, *extra: str) -> str:
        code, _, stderr = _export(*base, "--calibration", str(calibration), "--out", str(out), *extra)
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("export.py: error: "), stderr
        return lines[0]

    assert "missing is not a directory" in one_error(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert "holds no images" in one_error(tmp_path / "empty")
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    error = one_error(tmp_path / "broken")
    assert "calibration image" in error and "bad.jpg cannot be decoded" in error
    assert "has no val/ folder" in one_error(noise_root / "train", "--check-root", str(tmp_path))
    assert not out.exists()
    # Usage errors: exit status 2, one line.
    code, _, stderr = _export(*base, "--out", str(out))
    assert code == 2 and stderr.strip() == (
        "export.py: error: --quantize int8 needs --calibration <folder of training images>"
    )
    torchscript = ("--model", NAME, "--checkpoint", str(untrained), "--format", "torchscript", "--quantize", "int8")
    code, _, stderr = _export(*torchscript, "--calibration", str(tmp_path), "--out", str(out))
    assert code == 2 and "use --format onnx" in stderr


def test_reduce_range_stores_7_bit_weights_and_says_so(untrained, noise_root, tmp_path):
    base = ("--model", NAME, "--checkpoint", str(untrained), "--format", "onnx", "--quantize", "int8")
    base += ("--calibration", str(noise_root / "train"), "--calibration-images", "8")
    largest = {}
    for reduced in (False, True):
        out = tmp_path / f"reduced_{reduced}.int8.onnx"
        code, stdout, stderr = _export(*base, "--out", str(out), *(["--reduce-range"] if reduced else []))
        assert code == 0, stdout + stderr
        assert ("7-bit weights" in stdout) is reduced
        assert ("7-bit (reduce_range)" in onnx_metadata(out)["quantization"]) is reduced
        weights = [t for t in onnx.load(out).graph.initializer if t.data_type == onnx.TensorProto.INT8]
        largest[reduced] = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()) for t in weights)
        assert OnnxRuntimeModel(out, threads=1)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert largest == {False: 127, True: 64}, largest  # per-channel symmetric: each channel's largest weight
    code, _, stderr = _export(
        "--model",
        NAME,
        "--checkpoint",
        str(untrained),
        "--out",
        str(tmp_path / "f.onnx"),
        "--format",
        "onnx",
        "--reduce-range",
    )
    assert code == 2 and "--reduce-range belong to --quantize int8" in stderr


@pytest.mark.slow
def test_eval_released_adds_the_int8_columns(noise_root, tmp_path, monkeypatch):
    """make eval's table with --int8: the checkpoint (here a reduced one in the cache) quantised with calibration
    from <data>/train and evaluated by runtime=onnxruntime on the same val images; its results and files kept."""
    import csv

    from res2net.models.download import sha256_file
    from scripts import eval_released

    cache = tmp_path / "cache"
    cache.mkdir()
    arch = dict(layers=[1, 1, 1, 1], base_width=4, num_classes=3)
    torch.manual_seed(0)
    torch.save(res2net.create_model(NAME, **arch).state_dict(), cache / "tmp.pth")
    file = f"tiny-{sha256_file(cache / 'tmp.pth')[:8]}.pth"
    (cache / "tmp.pth").rename(cache / file)
    monkeypatch.setenv("RES2NET_CACHE", str(cache))
    zoo = tmp_path / "zoo.json"
    zoo.write_text(json.dumps({NAME: {"file": file, "top1": None, "top5": None, "overrides": arch}}))
    out = tmp_path / "out"
    code = eval_released.main(
        [
            *("--data", str(noise_root), "--published", str(zoo), "--out-dir", str(out), "--img-size", "32"),
            *("--batch-size", "16", "--workers", "0", "--no-progress", "--int8", "--calibration-images", "20"),
        ]
    )
    assert code == 0
    with open(out / "released_torchvision.csv") as f:
        (row,) = list(csv.DictReader(f))
    int8 = json.loads((out / NAME / "int8" / "results.json").read_text())
    assert int8["count"] == 101 and int8["config"]["runtime"] == "onnxruntime"
    assert float(row["int8_top1"]) == pytest.approx(int8["top1"]) and float(row["int8_top5"]) == int8["top5"]
    assert float(row["int8_minus_fp32_top1"]) == pytest.approx(int8["top1"] - float(row["top1"]))
    meta = onnx_metadata(out / NAME / "int8" / f"{NAME}.int8.onnx")
    assert meta["precision"] == "int8" and meta["calibration_images"] == "20"
    assert json.loads(meta["calibration_preprocessing"])["crop_pct"] == 0.875  # the published protocol
    assert "| int8 top-1 |" in (out / "released_torchvision.md").read_text()
