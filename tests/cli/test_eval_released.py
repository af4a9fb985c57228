"""`make eval` logic (scripts/eval_released.py) on a local folder with checkpoints made here and served by a real HTTP
server on 127.0.0.1: download into the cache, the table (printed, Markdown, CSV), the tolerance exit code, and the
DALI path's delta to the torchvision reference."""

import csv
import functools
import hashlib
import http.server
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from local_server import local_http_server
from PIL import Image

import res2net
from scripts import eval_released

ROOT = Path(__file__).resolve().parents[2]
TINY = {"layers": [1, 1, 1, 1], "base_width": 4, "num_classes": 3}
MODELS = ("res2net50_26w_4s", "res2net50_26w_8s")  # 8s has the wider tolerance (0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for i in range(15):
        cls_dir = root / "val" / f"n0{i % 3}"
        cls_dir.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((40, 36), Image.BILINEAR).save(cls_dir / f"{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Reduced checkpoints named <stem>-<sha256 prefix>.pth, served over HTTP; yields (base URL, {model: file})."""
    served = tmp_path_factory.mktemp("served")
    files = {}
    for seed, name in enumerate(MODELS):
        torch.manual_seed(seed)
        model = res2net.create_model(name, num_classes=3, layers=TINY["layers"], base_width=4)
        tmp = served / "tmp.pth"
        torch.save(model.state_dict(), tmp)
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        files[name] = f"tiny_{name}-{sha[:8]}.pth"
        tmp.rename(served / files[name])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    with local_http_server(handler) as httpd:
        yield httpd.base, files


@pytest.fixture
def env(tmp_path, monkeypatch, server):
    base, _ = server
    monkeypatch.setenv("RES2NET_MIRRORS", base)
    monkeypatch.setenv("RES2NET_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _zoo(path, files, published):
    table = {
        name: {"file": files[name], "top1": published[name][0], "top5": published[name][1], "overrides": TINY}
        for name in MODELS
    }
    path.write_text(json.dumps(table))
    return path


def _run(folder, zoo, out_dir, *extra):
    return eval_released.main(
        [
            "--data",
            str(folder),
            "--published",
            str(zoo),
            "--out-dir",
            str(out_dir),
            "--img-size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--no-progress",
            *extra,
        ]
    )


def _csv(out_dir, backend="torchvision"):
    with open(Path(out_dir) / f"released_{backend}.csv") as f:
        return {r["model"]: r for r in csv.DictReader(f)}


def test_table_download_and_tolerance_exit_code(env, folder, server, capsys):
    _, files = server
    out = env / "out"
    # 1) no published numbers: downloads both files into the cache, measures, exits 0
    assert _run(folder, _zoo(env / "zoo.json", files, {m: (None, None) for m in MODELS}), out) == 0
    assert sorted(p.name for p in (env / "cache").iterdir()) == sorted(files.values())
    measured = _csv(out)
    assert set(measured) == set(MODELS)
    printed = capsys.readouterr().out
    assert "| res2net50_26w_4s |" in printed and "unpublished" in printed
    top1 = {m: float(measured[m]["top1"]) for m in MODELS}
    top5 = {m: float(measured[m]["top5"]) for m in MODELS}
    for m in MODELS:
        assert 0 <= top1[m] <= 100 and top5[m] == 100.0  # 3 classes
        assert float(measured[m]["params_m"]) > 0 and float(measured[m]["gmacs"]) > 0
        results = json.loads((out / m / "torchvision" / "results.json").read_text())
        assert results["count"] == 15 and results["top1"] == top1[m]

    # 2) published = measured (4s) and measured + 0.25 (8s, tolerance 0.3): passes, deltas in the table
    zoo = _zoo(
        env / "zoo.json", files, {MODELS[0]: (top1[MODELS[0]], 100.0), MODELS[1]: (top1[MODELS[1]] + 0.25, 100.0)}
    )
    assert _run(folder, zoo, out) == 0
    rows = _csv(out)
    assert float(rows[MODELS[0]]["delta_top1"]) == 0.0 and rows[MODELS[0]]["status"] == "ok"
    assert float(rows[MODELS[1]]["delta_top1"]) == pytest.approx(-0.25) and rows[MODELS[1]]["tolerance"] == "0.3"
    md = (out / "released_torchvision.md").read_text()
    assert "| published top-1 |" in md and "-0.250" in md

    # 3) 0.25 off for the 4s model (tolerance 0.1): exit code 1, the row says FAIL and stderr names the model
    capsys.readouterr()
    zoo = _zoo(
        env / "zoo.json", files, {MODELS[0]: (top1[MODELS[0]] - 0.25, 100.0), MODELS[1]: (top1[MODELS[1]], 100.0)}
    )
    assert _run(folder, zoo, out) == 1
    assert _csv(out)[MODELS[0]]["status"] == "FAIL" and _csv(out)[MODELS[1]]["status"] == "ok"
    assert "res2net50_26w_4s (tolerance 0.1)" in capsys.readouterr().err
    # a top-5 delta counts too
    zoo = _zoo(env / "zoo.json", files, {MODELS[0]: (top1[MODELS[0]], 99.0), MODELS[1]: (top1[MODELS[1]], 100.0)})
    assert _run(folder, zoo, out, "--models", MODELS[0]) == 1


def test_dali_reports_delta_to_reference(env, folder, server):
    _, files = server
    zoo = _zoo(env / "zoo.json", files, {m: (None, None) for m in MODELS})
    out = env / "out"
    assert _run(folder, zoo, out, "--models", MODELS[0]) == 0  # the torchvision reference, saved in out
    assert _run(folder, zoo, out, "--models", MODELS[0], "--backend", "dali") == 0
    tv, dali = _csv(out)[MODELS[0]], _csv(out, "dali")[MODELS[0]]
    assert float(dali["dali_minus_torchvision_top1"]) == pytest.approx(float(dali["top1"]) - float(tv["top1"]))
    assert "DALI - torchvision top-1" in (out / "released_dali.md").read_text()


def test_errors_name_the_choices(env, folder, server, capsys):
    _, files = server
    zoo = _zoo(env / "zoo.json", files, {m: (None, None) for m in MODELS})
    assert _run(folder, zoo, env / "out", "--models", "res2net999") == 2
    assert "res2net50_26w_4s" in capsys.readouterr().err
    (env / "bad.json").write_text(json.dumps({"res2net50_26w_4s": {"top1": 1.0}}))
    assert _run(folder, env / "bad.json", env / "out") == 2
    assert "needs 'file'" in capsys.readouterr().err


def test_released_table_defaults():
    entries = eval_released.released_entries()
    assert set(entries) == set(res2net.models.RELEASED)
    assert entries["res2net50_26w_8s"].tolerance == 0.3 and entries["res2net50_26w_4s"].tolerance == 0.1
    assert entries["res2net50_26w_4s"].top1 == pytest.approx(77.994)
    assert entries["res2net50_26w_4s"].file == "res2net50_26w_4s-06e79181.pth"
    # --tolerance replaces every model's own
    assert {e.tolerance for e in eval_released.released_entries(0.5).values()} == {0.5}
