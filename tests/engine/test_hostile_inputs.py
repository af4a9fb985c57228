"""Hostile inputs: property-based tests of the checkpoint reader (random bytes, truncations, wrong zip members,
pickles calling disallowed globals) and a data root with odd names, hidden and non-image files, symlinks, a symlink
loop, an image declaring 400 megapixels and an empty class folder."""

import builtins
import functools
import io
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import res2net
from res2net.data import DataConfig, build_loader, scan_split
from res2net.errors import CheckpointError, UnsafeCheckpointError
from res2net.models.pretrained import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every CI run
WORK = Path(tempfile.mkdtemp(prefix="hostile-"))  # hypothesis reruns a test body many times: one folder for all
MARKER = WORK / "marker"


@functools.cache
def _real_checkpoint() -> bytes:
    """The bytes of a train.py-like checkpoint (a function, not a fixture: hypothesis would print its repr)."""
    model = res2net.create_model("res2net50_26w_4s", num_classes=2, layers=[1, 1, 1, 1], base_width=4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 1, "rng": [{"numpy": ["MT19937", torch.arange(4), 0]}]}, buffer)
    return buffer.getvalue()


def _read(data: bytes, suffix: str = ".pth"):
    path = WORK / f"candidate{suffix}"
    path.write_bytes(data)
    try:
        return read_checkpoint(path)
    finally:
        assert not MARKER.exists(), "a checkpoint ran code while being read"


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_give_a_checkpoint_error(data):
    try:
        _read(data)
    except CheckpointError:
        pass


@PROPERTY
@given(st.binary(max_size=512))
def test_random_bytes_as_safetensors_give_a_checkpoint_error(data):
    try:
        _read(data, ".safetensors")
    except CheckpointError:
        pass


@PROPERTY
@given(st.data())
def test_every_truncation_gives_a_checkpoint_error(data):
    real_checkpoint = _real_checkpoint()
    size = len(real_checkpoint)
    # The three classes of cut: inside the zip's first header, in the middle (pickle, tensor data) and near the end
    # (the central directory).
    cut = data.draw(st.one_of(st.integers(0, 64), st.integers(65, size - 1024), st.integers(size - 1024, size - 1)))
    with pytest.raises(CheckpointError):
        _read(real_checkpoint[:cut])


@PROPERTY
@given(st.data())
def test_corrupted_bytes_give_weights_or_a_checkpoint_error(data):
    damaged = bytearray(_real_checkpoint())
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    try:
        _read(bytes(damaged))
    except CheckpointError:
        pass


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["data.pkl", "x/data.pkl", "x/version", "x/data/0", "README", "a/b/c"]),
        st.binary(max_size=256),
        min_size=1,
    )
)
def test_zip_archives_with_wrong_members_give_a_checkpoint_error(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(CheckpointError):
        _read(buffer.getvalue())


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


_TOUCH = f"open({str(MARKER)!r}, 'w').close()"
_CALLS = [
    (os.system, (f"touch '{MARKER}'",)),
    (builtins.exec, (_TOUCH,)),
    (builtins.eval, (_TOUCH,)),
    (subprocess.call, (["touch", str(MARKER)],)),
    (shutil.copyfile, (__file__, str(MARKER))),
    (Path.touch, (MARKER,)),
]


@PROPERTY
@given(st.sampled_from(_CALLS), st.integers(0, pickle.HIGHEST_PROTOCOL), st.booleans())
def test_pickles_calling_disallowed_globals_are_refused_and_run_nothing(call, protocol, through_torch_save):
    payload = {"model": {"fc.weight": torch.zeros(2, 2)}, "hook": _Call(*call)}
    buffer = io.BytesIO()
    if through_torch_save:
        torch.save(payload, buffer, pickle_protocol=max(protocol, 2))
    else:
        pickle.dump(payload, buffer, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        _read(buffer.getvalue())


# --- data ---------------------------------------------------------------------------------------------------------

ODD_NAMES = ("with space.jpg", "ünïcödé 画像.JPEG", "new\nline.jpg", "semi;colon,comma.jpg")


def _jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header for width x height RGB pixels with almost no data: a few hundred bytes on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose start-of-frame header is patched to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BOMB_SIDE = 20000  # 20000 x 20000 = 400 megapixels


@pytest.fixture()
def hostile_root(tmp_path) -> Path:
    """train/ and val/ with two classes each holding a normal image, odd names, a symlink, a symlink loop, hidden and
    non-image files; a hidden class folder and a class folder that is a symlink loop."""
    for split in ("train", "val"):
        for c, cls in enumerate(("n01", "n02")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            _jpeg(folder / "plain.jpg", c)
            for i, name in enumerate(ODD_NAMES):
                _jpeg(folder / name, 10 + i)
            os.symlink(folder / "plain.jpg", folder / "linked.jpg")
            os.symlink("loop.jpg", folder / "loop.jpg")  # ELOOP when followed
            (folder / ".hidden.jpg").write_bytes(b"not an image")
            (folder / "._plain.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork, hidden
            (folder / "notes.txt").write_text("not an image")
            (folder / "labels.csv").write_text("a,b\n")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        _jpeg(tmp_path / split / ".ipynb_checkpoints" / "x.jpg", 99)
        os.symlink(tmp_path / split / "looped", tmp_path / split / "looped")
    return tmp_path


def test_index_keeps_real_images_and_skips_hidden_links_loops_and_other_files(hostile_root, caplog):
    with caplog.at_level(logging.WARNING):
        samples, classes = scan_split(str(hostile_root), "val")
    assert classes == ["n01", "n02"]  # no hidden folder, no looping link
    names = sorted({Path(p).name for p, _ in samples})
    assert names == sorted(["plain.jpg", "linked.jpg", *ODD_NAMES])
    assert len(samples) == 2 * len(names)
    assert "loop.jpg" in caplog.text  # skipped with a warning naming it


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_loaders_read_odd_names_and_links(hostile_root, backend):
    cfg = DataConfig(root=str(hostile_root), backend=backend, batch_size=4, num_workers=1, img_size=16)
    for split in ("train", "val"):
        loader = build_loader(cfg, split)
        try:
            count = sum(len(labels) for _, labels in loader)
        finally:
            loader.close()
        assert count == (loader.num_samples if split == "train" else 2 * (2 + len(ODD_NAMES)))
        assert loader.skipped == 0


def _with_bomb(root: Path, data: bytes, name: str) -> Path:
    path = root / "val" / "n01" / name
    path.write_bytes(data)
    shutil.copy(path, root / "train" / "n01" / name)
    return path


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_torchvision_skips_a_400_megapixel_image_naming_it(hostile_root, caplog, kind):
    data = _png_declaring(BOMB_SIDE, BOMB_SIDE) if kind == "png" else _jpeg_declaring(BOMB_SIDE, BOMB_SIDE)
    bomb = _with_bomb(hostile_root, data, f"bomb.{'png' if kind == 'png' else 'jpg'}")
    assert bomb.stat().st_size < 2000
    cfg = DataConfig(root=str(hostile_root), backend="torchvision", batch_size=4, num_workers=0, img_size=16)
    loader = build_loader(cfg, "val")
    with caplog.at_level(logging.WARNING):
        count = sum(len(labels) for _, labels in loader)
    loader.close()
    assert count == loader.num_samples and loader.skipped == 1
    assert str(bomb) in caplog.text and "DecompressionBomb" in caplog.text


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_dali_refuses_a_400_megapixel_image_naming_it(hostile_root, split, kind):
    data = _png_declaring(BOMB_SIDE, BOMB_SIDE) if kind == "png" else _jpeg_declaring(BOMB_SIDE, BOMB_SIDE)
    bomb = _with_bomb(hostile_root, data, f"bomb.{'png' if kind == 'png' else 'jpg'}")
    # 13 images per split (6 per class and the bomb): one batch, so train's epoch cannot leave the bomb out.
    cfg = DataConfig(root=str(hostile_root), backend="dali", batch_size=13, num_workers=1, img_size=16)
    loader = build_loader(cfg, split)
    try:
        with pytest.raises(RuntimeError, match="cannot use") as info:
            for _ in loader:
                pass
    finally:
        loader.close()
    assert str(hostile_root / split / "n01" / bomb.name) in str(info.value)
    assert "megapixel" in str(info.value) or "decompression bomb" in str(info.value)


def test_check_dataset_reports_a_400_megapixel_image_as_too_large(hostile_root):
    bomb = _with_bomb(hostile_root, _png_declaring(BOMB_SIDE, BOMB_SIDE), "bomb.png")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "check_dataset.py"),
            str(hostile_root / "val"),
            "--no-progress",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"too_large\t{bomb}\t" in proc.stdout
    assert "loop.jpg" in proc.stdout  # a symlink loop is unreadable, named


def test_an_empty_class_folder_is_named(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    _jpeg(tmp_path / "train" / "n01" / "a.jpg", 0)
    (tmp_path / "train" / "n02").mkdir()
    (tmp_path / "train" / "n02" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=f"class folder '{tmp_path / 'train' / 'n02'}' holds no images"):
        scan_split(str(tmp_path), "train")
