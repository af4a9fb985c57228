"""scripts/prepare_imagenet.py keeps hostile names from the downloads inside --out (issue 21, item 5): a class name
``../../x`` in the Kaggle CSV or in the devkit's meta.mat is one error naming it and its source, and no file appears
outside --out."""

from pathlib import Path

import pytest
from test_prepare_imagenet import SYNSETS, make_kaggle, make_official, run

HOSTILE = "../../x"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _refused(result, source: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [s for s in result.stderr.splitlines() if s.startswith("error: ")]
    assert repr(HOSTILE) in line and source in line, line
    return line


def _nothing_outside(tmp_path: Path, out: Path, before: set[Path]) -> None:
    written = _files(tmp_path) - before
    assert all(p.is_relative_to(out) for p in written), sorted(written)


@pytest.mark.parametrize("pattern", [None, ".*"])
def test_a_hostile_class_in_the_kaggle_csv_writes_nothing_outside_out(tmp_path, pattern):
    """Today's code took the CSV's first PredictionString token as a folder name unchecked: with ``../../x`` it
    placed val images in <out>/../x/, outside --out, and exited 1 only for the count mismatch. A lax
    --class-pattern does not let it through: a class must be one plain path component whatever the pattern."""
    src, out = tmp_path / "kaggle", tmp_path / "deep" / "er" / "out"
    make_kaggle(src)
    csv = src / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    wnid = lines[2].split(",")[1].split()[0]
    lines[2] = lines[2].replace(wnid, HOSTILE)
    csv.write_text("\n".join(lines) + "\n")
    before = _files(tmp_path)
    extra = [] if pattern is None else ["--class-pattern", pattern]
    result = run("--kaggle", str(src), "--out", str(out), "--splits", "val", "--no-progress", *extra)
    _refused(result, f"{csv} line 3")
    _nothing_outside(tmp_path, out, before)
    assert not list(out.rglob("*.JPEG"))  # refused before the first file was placed


def test_a_hostile_class_in_the_devkit_writes_nothing_outside_out(tmp_path):
    """Today's code took meta.mat's WNID as a folder name unchecked: ``../../x`` put val images in <out>/../x/."""
    src, out = tmp_path / "src", tmp_path / "deep" / "er" / "out"
    make_official(src, synsets=[(i, HOSTILE if i == 2 else w, k) for i, w, k in SYNSETS])
    before = _files(tmp_path)
    result = run("--archives", str(src), "--out", str(out), "--splits", "val", "--no-progress")
    _refused(result, "meta.mat")
    _nothing_outside(tmp_path, out, before)
    assert not list(out.rglob("*.JPEG"))


def test_a_name_that_is_not_a_wnid_is_refused_unless_the_pattern_admits_it(tmp_path):
    """A Kaggle train folder named ``cat`` is not an ImageNet wnid: refused by default, naming the pattern and the
    flag; accepted with --class-pattern for another data set laid out the same way."""
    src, out = tmp_path / "kaggle", tmp_path / "out"
    make_kaggle(src)
    train = src / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    (train / "n01000001").rename(train / "cat")
    result = run("--kaggle", str(src), "--out", str(out), "--splits", "train", "--no-progress")
    assert result.returncode == 1 and "'cat'" in result.stderr and "--class-pattern" in result.stderr
    assert not (out / "train").exists()
    lax = run(
        "--kaggle", str(src), "--out", str(out), "--splits", "train", "--no-progress", "--class-pattern", r"n\d{8}|cat"
    )
    assert lax.returncode == 0, lax.stderr
    assert (out / "train" / "cat" / "n01000001_0.JPEG").is_file()
