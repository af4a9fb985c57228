"""scripts/check_dataset.py on real problem files: PNG named .JPEG, CMYK JPEG, grayscale JPEG, truncated JPEG,
zero-byte file; --fix writes the change list, backs up, re-encodes the convertible ones and deletes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from res2net.data.index import IMG_EXTENSIONS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_dataset.py"


@pytest.fixture
def bad_folder(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    cls = tmp_path / "train" / "n01440764"
    cls.mkdir(parents=True)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    files = {name: cls / f"{name}.JPEG" for name in ("good", "png", "cmyk", "gray", "truncated", "empty")}
    Image.fromarray(rgb).save(files["good"], "JPEG")
    Image.fromarray(rgb).save(files["png"], "PNG")
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], "JPEG")
    Image.fromarray(rgb[..., 0]).save(files["gray"], "JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files["truncated"], "JPEG")
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    return {"root": tmp_path, "split": tmp_path / "train", **files}


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args), "--workers", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def report_lines(stdout: str) -> dict:
    rows = [line.split("\t") for line in stdout.splitlines() if line.count("\t") == 2]
    return {Path(path).stem: category for category, path, _ in rows}


def test_reports_each_problem_by_path(bad_folder, tmp_path):
    result = run(bad_folder["split"], "--json", tmp_path / "report.json")
    assert result.returncode == 1
    assert "checked 6 files" in result.stdout
    assert report_lines(result.stdout) == {
        "png": "not_jpeg",
        "cmyk": "cmyk",
        "gray": "grayscale",
        "truncated": "undecodable",
        "empty": "zero_byte",
    }
    report = json.loads((tmp_path / "report.json").read_text())
    assert {Path(r["path"]).stem: r["problem"] for r in report} == report_lines(result.stdout)
    assert str(bad_folder["png"]) in result.stdout


def test_fix_reencodes_convertible_and_deletes_nothing(bad_folder, tmp_path):
    before = {p.name: p.read_bytes() for p in bad_folder["split"].rglob("*") if p.is_file()}
    changes, backup = tmp_path / "changes.txt", tmp_path / "backup"
    result = run(bad_folder["split"], "--fix", "--changes", changes, "--backup-dir", backup)
    assert result.returncode == 1  # the truncated and empty files remain problems
    listed = {Path(line.split("\t")[0]).stem: line.split("\t")[3] for line in changes.read_text().splitlines()}
    assert listed == {
        "png": "re-encode as RGB JPEG",
        "cmyk": "re-encode as RGB JPEG",
        "gray": "re-encode as RGB JPEG",
        "truncated": "left as is (not convertible)",
        "empty": "left as is (not convertible)",
    }
    after = {p.name: p for p in bad_folder["split"].rglob("*") if p.is_file()}
    assert sorted(after) == sorted(before)  # nothing deleted, no temporary files left
    for name in ("png", "cmyk", "gray"):
        with Image.open(after[f"{name}.JPEG"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
        assert (backup / "train" / "n01440764" / f"{name}.JPEG").read_bytes() == before[f"{name}.JPEG"]
    for name in ("good", "truncated", "empty"):
        assert after[f"{name}.JPEG"].read_bytes() == before[f"{name}.JPEG"]

    again = run(bad_folder["split"])
    assert report_lines(again.stdout) == {"truncated": "undecodable", "empty": "zero_byte"}


def test_clean_folder_exits_zero(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.JPEG")
    assert run(tmp_path).returncode == 0
    missing = run(tmp_path / "nope")
    assert missing.returncode != 0 and "neither a file nor a folder" in missing.stderr


def test_scans_the_files_the_loaders_read():
    from scripts import check_dataset

    assert check_dataset.IMG_EXTENSIONS == IMG_EXTENSIONS
