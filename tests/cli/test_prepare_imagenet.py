"""scripts/prepare_imagenet.py on small fake archives built here: official tars + devkit (meta.mat), Kaggle CSV,
an interrupted run (truncated downloads) finished by a second run, idempotence and the count check."""

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from res2net.data import scan_split

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_imagenet.py"
# ILSVRC2012_ID order is deliberately not the sorted-wnid order; ID 4 is an inner node (not a class).
SYNSETS = [(1, "n03000003", 0), (2, "n01000001", 0), (3, "n02000002", 0), (4, "n00000009", 3)]
VAL_IDS = [2, 1, 3, 3, 1, 2, 2]  # ground truth of ILSVRC2012_val_00000001..7
TRAIN_PER_CLASS = {"n01000001": 3, "n02000002": 2, "n03000003": 4}


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_official(folder: Path, synsets=SYNSETS) -> None:
    folder.mkdir()
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, (wnid, n) in enumerate(sorted(TRAIN_PER_CLASS.items())):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(n):
                    add_bytes(tar, f"{wnid}_{i}.JPEG", jpeg_bytes(100 * c + i))
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(len(VAL_IDS)):
            add_bytes(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(1000 + i))
    synsets = np.array(
        [(i, w, f"words {w}", k) for i, w, k in synsets],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{i}\n" for i in VAL_IDS).encode()
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


def make_kaggle(folder: Path) -> None:
    base = folder / "ILSVRC" / "Data" / "CLS-LOC"
    for c, (wnid, n) in enumerate(sorted(TRAIN_PER_CLASS.items())):
        (base / "train" / wnid).mkdir(parents=True)
        for i in range(n):
            (base / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(100 * c + i))
    (base / "val").mkdir(parents=True)
    id_to_wnid = {i: w for i, w, _ in SYNSETS}
    with open(folder / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i, label in enumerate(VAL_IDS):
            name = f"ILSVRC2012_val_{i + 1:08d}"
            (base / "val" / f"{name}.JPEG").write_bytes(jpeg_bytes(1000 + i))
            wnid = id_to_wnid[label]
            writer.writerow([name, f"{wnid} 1 2 10 12 {wnid} 3 4 5 6"])


def run(*args) -> subprocess.CompletedProcess:
    counts = ["--expected-train", "9", "--expected-val", "7", "--expected-classes", "3"]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, *counts],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def layout(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_layout() -> dict:
    out = {}
    for c, (wnid, n) in enumerate(sorted(TRAIN_PER_CLASS.items())):
        for i in range(n):
            out[f"train/{wnid}/{wnid}_{i}.JPEG"] = jpeg_bytes(100 * c + i)
    id_to_wnid = {i: w for i, w, _ in SYNSETS}
    for i, label in enumerate(VAL_IDS):
        out[f"val/{id_to_wnid[label]}/ILSVRC2012_val_{i + 1:08d}.JPEG"] = jpeg_bytes(1000 + i)
    return out


def truncate(path: Path, keep_fraction: float) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return data


def test_official_archives_interrupted_then_resumed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_official(src)
    # First run: both downloads are incomplete (cut in the middle of a class / of the val images).
    full_train = truncate(src / "ILSVRC2012_img_train.tar", 0.6)
    full_val = truncate(src / "ILSVRC2012_img_val.tar", 0.5)
    first = run("--archives", str(src), "--out", str(out), "--no-progress")
    assert first.returncode == 2 and "run the same command again" in first.stderr
    done_before = sorted(p.name for p in (out / "train").iterdir())
    assert done_before and len(done_before) < 3  # some classes finished, the cut one did not appear
    val_run = run("--archives", str(src), "--out", str(out), "--splits", "val", "--no-progress")
    assert val_run.returncode in (1, 2)
    assert 0 < len(list((out / "val").rglob("*.JPEG"))) < len(VAL_IDS)
    kept = {name: os.stat(out / "train" / name / f"{name}_0.JPEG").st_ino for name in done_before}

    (src / "ILSVRC2012_img_train.tar").write_bytes(full_train)
    (src / "ILSVRC2012_img_val.tar").write_bytes(full_val)
    stale = next((out / "val").glob("*/")) / ".ILSVRC2012_val_00000009.JPEG.tmp-4242"  # a killed run's leftover
    stale.write_bytes(b"half a file")
    second = run("--archives", str(src), "--out", str(out), "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "counts OK" in second.stdout
    assert layout(out) == expected_layout()  # nothing missing, duplicated or left over (.partial, temp files)
    for name, inode in kept.items():  # finished classes were not redone
        assert os.stat(out / "train" / name / f"{name}_0.JPEG").st_ino == inode

    again = run("--archives", str(src), "--out", str(out), "--no-progress")  # idempotent
    assert again.returncode == 0 and layout(out) == expected_layout()


def test_official_labels_follow_meta_mat_not_id_order(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_official(src)
    assert run("--archives", str(src), "--out", str(out), "--splits", "val", "--no-progress").returncode == 0
    # val_00000001 has ILSVRC2012_ID 2 -> n01000001 (the first wnid in sorted order, though ID 2)
    assert (out / "val" / "n01000001" / "ILSVRC2012_val_00000001.JPEG").is_file()
    samples, classes = scan_split(str(out), "val")
    assert classes == ["n01000001", "n02000002", "n03000003"]
    assert [label for p, label in samples if p.endswith("val_00000002.JPEG")] == [2]  # ID 1 -> n03000003 -> label 2


@pytest.mark.parametrize("link", ["hardlink", "symlink", "copy"])
def test_kaggle_layout(tmp_path, link):
    src, out = tmp_path / "kaggle", tmp_path / "out"
    make_kaggle(src)
    result = run("--kaggle", str(src), "--out", str(out), "--link", link, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert layout(out) == expected_layout()
    assert (out / "val" / "n01000001" / "ILSVRC2012_val_00000001.JPEG").is_symlink() == (link == "symlink")


def test_count_mismatch_and_missing_input_are_reported(tmp_path):
    src, out = tmp_path / "kaggle", tmp_path / "out"
    make_kaggle(src)
    (src / "ILSVRC" / "Data" / "CLS-LOC" / "train" / "n02000002" / "n02000002_1.JPEG").unlink()
    result = run("--kaggle", str(src), "--out", str(out), "--no-progress")
    assert result.returncode == 1
    assert "COUNT MISMATCH train: 8 images, expected 9 (-1)" in result.stderr

    missing = run("--archives", str(tmp_path / "nowhere"), "--out", str(out), "--splits", "val")
    assert missing.returncode != 0 and "ILSVRC2012_devkit_t12.tar.gz not found" in missing.stderr
