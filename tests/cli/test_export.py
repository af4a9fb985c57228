"""scripts/export.py and res2net.export: a round trip per format (ONNX Runtime, TorchScript, safetensors, a hub
folder read by timm and by res2net.load_pretrained) and the short errors for bad arguments."""

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open

import res2net
from res2net.engine.eval_loop import evaluate
from res2net.export import OPSET, OnnxRuntimeModel, max_relative_error
from scripts import export as export_script

ROOT = Path(__file__).resolve().parents[2]

NAME = "res2net50d"  # deep stem and average-pool shortcuts: the most layers to get right
ARCH = dict(num_classes=10, base_width=4, layers=[1, 1, 1, 1])
IMG = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, path): a reduced res2net50d with random BN statistics, saved as train.py saves a checkpoint."""
    torch.manual_seed(0)
    model = res2net.create_model(NAME, **ARCH).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    torch.save({"model": model.state_dict(), "config": {"model": {"name": NAME, **ARCH}}, "best_top1": 97.5}, path)
    return model, path


def _export(fmt: str, checkpoint: Path, out: Path, capsys) -> str:
    code = export_script.main(
        ["--model", NAME, "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), "--img-size", str(IMG)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _printed_error(out: str) -> float:
    error = float(re.search(r"max relative error ([0-9.e+-]+) \(< 1e-04\)", out).group(1))
    assert error < 1e-4
    return error


def test_onnx_round_trip_at_two_batch_sizes(trained, tmp_path, capsys):
    model, checkpoint = trained
    out = tmp_path / "model.onnx"
    printed = _printed_error(_export("onnx", checkpoint, out, capsys))
    proto = onnx.load(out)
    assert [op.version for op in proto.opset_import if op.domain == ""] == [OPSET]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)  # folded
    runner = OnnxRuntimeModel(out, threads=1)
    assert runner.num_classes == 10
    assert max_relative_error(runner, model, batch_sizes=(1, 3), img_size=IMG) < 1e-4
    # The runner takes what the evaluation loop gives it: channels_last batches, eval()/train() calls.
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        got = runner.eval()(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    assert printed > 0.0  # a real comparison ran (folding changes the rounding)
    # The evaluation loop runs it as it runs the PyTorch model (how evaluate.py runtime=onnxruntime would).
    batches = [
        (torch.randn(3, 3, IMG, IMG), torch.tensor([0, 4, 9])),
        (torch.randn(2, 3, IMG, IMG), torch.tensor([1, 2])),
    ]
    exported, reference = evaluate(runner, batches, device="cpu"), evaluate(model, batches, device="cpu")
    assert exported["count"] == 5 and exported["per_class_count"] == reference["per_class_count"]
    assert (exported["top1"], exported["top5"]) == (reference["top1"], reference["top5"])
    assert exported["loss"] == pytest.approx(reference["loss"], rel=1e-4)


def test_torchscript_is_reloaded_and_equal(trained, tmp_path, capsys):
    model, checkpoint = trained
    out = tmp_path / "model.pt"
    _printed_error(_export("torchscript", checkpoint, out, capsys))
    loaded = torch.jit.load(out)
    assert max_relative_error(loaded, model, batch_sizes=(1, 3), img_size=IMG) < 1e-4


def test_safetensors_holds_the_weights_only(trained, tmp_path, capsys):
    model, checkpoint = trained
    out = tmp_path / "weights.safetensors"
    _export("safetensors", checkpoint, out, capsys)
    with safe_open(out, "pt") as f:
        assert f.metadata()["architecture"] == NAME
        assert sorted(f.keys()) == sorted(model.state_dict())
    reloaded = res2net.create_model(NAME, **ARCH)
    res2net.load_pretrained(reloaded, out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_hf_folder_is_read_by_timm_and_by_res2net(trained, tmp_path, capsys):
    model, checkpoint = trained
    folder = tmp_path / "hub" / NAME
    _export("hf", checkpoint, folder, capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 10
    assert config["pretrained_cfg"]["first_conv"] == "conv1.0"
    card = (folder / "README.md").read_text()
    assert "license: unknown" in card and "## Recipe" in card and "97.500%" in card
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(x)
        # timm reads config.json itself (architecture, num_classes, model_args, pretrained_cfg) ...
        from_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(from_folder(x), expected, rtol=1e-5, atol=1e-5)
        data_cfg = timm.data.resolve_data_config(model=from_folder)
        assert tuple(data_cfg["input_size"]) == (3, IMG, IMG) and data_cfg["crop_pct"] == 0.875
        assert data_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data_cfg["interpolation"] == "bilinear"
        # ... and loads the weights file as the model card says.
        overlay = timm.create_model(
            NAME,
            pretrained=True,
            num_classes=10,
            **config["model_args"],
            pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=10),
        ).eval()
        torch.testing.assert_close(overlay(x), expected, rtol=1e-5, atol=1e-5)
        ours = res2net.create_model(NAME, **ARCH)
        res2net.load_pretrained(ours, folder / "model.safetensors")
        torch.testing.assert_close(ours.eval()(x), expected, rtol=0, atol=0)


class _Payload:
    """Unpickling this would create a file: the test checks that the exporter never runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_arguments_give_one_short_error(trained, tmp_path, capsys):
    _model, checkpoint = trained
    # A usage error: exit status 2, one line, no traceback (the real command line).
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export.py"),
            "--model",
            NAME,
            "--checkpoint",
            str(checkpoint),
            "--format",
            "tflite",
            "--out",
            str(tmp_path / "m"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export.py: error: argument --format: invalid choice: 'tflite'")

    def run(*args: str) -> tuple[int, str]:
        try:
            code = export_script.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("export.py: error: ")
        return code, err

    out = str(tmp_path / "m.onnx")
    code, err = run("--model", "resnet50", "--checkpoint", "released", "--format", "onnx", "--out", out)
    assert code == 2 and "invalid choice: 'resnet50'" in err
    code, err = run("--model", NAME, "--checkpoint", str(tmp_path / "missing.pth"), "--format", "onnx", "--out", out)
    assert code == 1 and "missing.pth' is not a file" in err
    other = tmp_path / "other.pth"
    torch.save(res2net.create_model("res2net50_26w_4s", **ARCH).state_dict(), other)
    code, err = run("--model", NAME, "--checkpoint", str(other), "--format", "onnx", "--out", out)
    assert code == 1 and "does not fit this Res2Net" in err and "missing keys" in err
    marker = tmp_path / "code-ran"
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "payload": _Payload(marker)}, unsafe)
    code, err = run("--model", NAME, "--checkpoint", str(unsafe), "--format", "safetensors", "--out", out)
    assert code == 1 and "can run arbitrary code" in err and "trusted=True" in err and not marker.exists()
    assert not Path(out).exists()


def test_evaluate_runtime_onnxruntime_matches_the_pytorch_model(trained, noise_root, tmp_path):
    """evaluate.py runtime=onnxruntime: the exported file scored on a real JPEG folder like the checkpoint it came
    from (same counts and top-1, loss within float tolerance); a non-.onnx checkpoint is refused by name."""
    from res2net.engine.eval_job import evaluate_checkpoint
    from res2net.export import export_onnx

    model, checkpoint = trained
    onnx_file = export_onnx(model, tmp_path / "model.onnx", img_size=IMG)
    common = {
        "model": {"name": NAME, **ARCH},
        "data": {
            "root": str(noise_root),
            "backend": "torchvision",
            "img_size": IMG,
            "batch_size": 16,
            "num_workers": 0,
        },
        "device": "cpu",
        "progress": False,
    }
    torch_run = evaluate_checkpoint({**common, "checkpoint": str(checkpoint)}, tmp_path / "torch")
    ort_run = evaluate_checkpoint({**common, "checkpoint": str(onnx_file), "runtime": "onnxruntime"}, tmp_path / "ort")
    assert ort_run["count"] == torch_run["count"] == 101
    assert ort_run["top1"] == torch_run["top1"] and ort_run["top5"] == torch_run["top5"]
    assert ort_run["loss"] == pytest.approx(torch_run["loss"], rel=1e-4)
    assert json.loads((tmp_path / "ort" / "results.json").read_text())["config"]["runtime"] == "onnxruntime"
    with pytest.raises(ValueError, match=r"runtime=onnxruntime needs checkpoint=<file>\.onnx"):
        evaluate_checkpoint({**common, "checkpoint": str(checkpoint), "runtime": "onnxruntime"}, tmp_path / "bad")
