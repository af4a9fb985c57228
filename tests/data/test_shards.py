"""WebDataset shards (data.format=wds): scripts/make_shards.py round trip, the epoch order, both backends reading
shards (the same batches, exact resume, every val sample once), bad shards; the slow ones run train.py /
evaluate.py under torchrun on shards and compare with the same images as a folder."""

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import test_evaluate_cli
import test_train
import torch
from test_data_helpers import colour_ids, grey_level_diff, write_colour_split, write_noise_split

from res2net.data import DataConfig, build_loader, scan_split
from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS
from res2net.data.shards import ShardError, expand_braces, resolve_shards, wds_epoch_order
from res2net.engine.eval_metrics import real_label_rows
from res2net.errors import run_script
from scripts import make_shards as make_shards_script

# test_train's and test_evaluate_cli's processes, helpers and fixtures, reused on shards
train_folder, eval_folder, eval_checkpoint = test_train.folder, test_evaluate_cli.folder, test_evaluate_cli.checkpoint

pytest.importorskip("nvidia.dali")

REPO = Path(__file__).resolve().parents[2]
MAKE = [sys.executable, str(REPO / "scripts" / "make_shards.py")]
STD = DataConfig().std


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_make_shards(*argv: str) -> subprocess.CompletedProcess:
    """scripts/make_shards.py's main in this process (a fresh interpreter costs ~15 s on the shared test machine),
    reported as the script reports it: exit status, stdout, and stderr with its one ``error:`` line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_script(lambda: make_shards_script.main([*argv, "--no-progress"]))
    return subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())


def make_shards(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_make_shards("--root", str(root), "--out", str(out), *args)


def _cfg(shards: Path, backend: str = "torchvision", **kw) -> DataConfig:
    settings = dict(batch_size=4, num_workers=0, img_size=32, train_shards=str(shards), val_shards=str(shards))
    if backend == "dali":
        settings.update(num_workers=1)
    return DataConfig(format="wds", backend=backend, **{**settings, **kw})


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """(folder, shards): 29 train / 23 val uniformly coloured JPEGs (a colour per file) as class folders, and as
    shards of 5 samples (uneven: the last of each split is shorter)."""
    root = tmp_path_factory.mktemp("colour")
    write_colour_split(root, "train", 29)
    write_colour_split(root, "val", 23)
    out = root / "shards"
    proc = make_shards(root, out, "--shard-size", "5")
    assert proc.returncode == 0, proc.stderr
    return root, out


def test_expand_braces_and_refused_specs(tmp_path):
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{0..1}-{0..1}") == ["0-0", "0-1", "1-0", "1-1"]
    with pytest.raises(ValueError, match="pipe: commands are not supported"):
        resolve_shards("pipe:curl -s http://x/a.tar", "train", "train_shards")
    with pytest.raises(ShardError, match=r"shard .*b-1\.tar does not exist"):
        (tmp_path / "b-0.tar").write_bytes(b"")
        resolve_shards(str(tmp_path / "b-{0..1}.tar"), "train", "train_shards")
    with pytest.raises(FileNotFoundError, match="without a manifest.json"):
        resolve_shards(str(tmp_path), "val", "val_shards")
    with pytest.raises(ValueError, match="data.train_shards is not set"):
        resolve_shards(None, "train", "train_shards")


def test_epoch_order_depends_only_on_seed_and_epoch():
    counts = [5, 3, 7, 1]
    order = wds_epoch_order(counts, seed=1, epoch=2)
    assert sorted(order.tolist()) == list(range(16))
    assert np.array_equal(order, wds_epoch_order(counts, seed=1, epoch=2))
    assert not np.array_equal(order, wds_epoch_order(counts, seed=1, epoch=3))
    starts = np.cumsum([0, *counts])
    shard = np.searchsorted(starts, order, side="right") - 1
    assert (np.diff(shard) != 0).sum() == len(counts) - 1  # each shard read in one run
    sequential = wds_epoch_order(counts, seed=1, epoch=2, in_shard=False)
    for s in range(len(counts)):  # in file order inside each shard
        run = sequential[np.searchsorted(starts, sequential, side="right") - 1 == s]
        assert run.tolist() == list(range(starts[s], starts[s + 1]))


def test_make_shards_round_trip_idempotent_and_resumable(tmp_path, colour):
    root, out = colour
    manifest = json.loads((out / "manifest.json").read_text())
    for split, n in (("train", 29), ("val", 23)):
        folder, classes = scan_split(str(root), split)
        info = manifest["splits"][split]
        assert info["samples"] == n and [s["samples"] for s in info["shards"]] == [5] * (n // 5) + [n % 5]
        seen = {}
        for entry in info["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
                        label = int(tar.extractfile(member.name[: -len("json")] + "cls").read())
                        assert meta["filename"] not in seen
                        seen[meta["filename"]] = label
            assert entry["labels"] == [seen[k] for k in list(seen)[-entry["samples"] :]]
        assert seen == {os.path.relpath(p, root / split): label for p, label in folder}
        assert manifest["classes"] == classes
    # val keeps the folder's order; train is shuffled once
    val_names = resolve_shards(str(out), "val", "val_shards")
    assert [Path(p).name for p in val_names] == [f"val-{k:04d}.tar" for k in range(5)]
    # the DALI index files are what DALI's own wds2idx writes
    wds2idx = pytest.importorskip("wds2idx")
    with wds2idx.IndexCreator(str(out / "train-0000.tar"), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_text() == (out / "train-0000.idx").read_text()
    # idempotent: a re-run keeps every file as it is; the same command elsewhere writes the same bytes
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    proc = make_shards(root, out, "--shard-size", "5")
    assert proc.returncode == 0 and "up to date" in proc.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    copy = tmp_path / "copy"
    assert make_shards(root, copy, "--shard-size", "5").returncode == 0
    assert all((copy / name).read_bytes() == data for name, (_, data) in before.items())
    # resumable: an interrupted run (no manifest yet, a shard missing, a temporary file left) is finished
    (copy / "manifest.json").unlink()
    (copy / "train-0003.tar").unlink()
    (copy / ".train-0004.tar.tmp-123").write_bytes(b"partial")
    (copy / ".make_shards_plan.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"]}))
    assert make_shards(root, copy, "--shard-size", "5").returncode == 0
    assert sorted(p.name for p in copy.iterdir()) == sorted(before)
    assert all((copy / name).read_bytes() == data for name, (_, data) in before.items())
    # other options into a finished folder are refused
    proc = make_shards(root, copy, "--shard-size", "4")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "another folder or with other" in proc.stderr
    check = run_make_shards("--out", str(copy), "--check")
    assert check.returncode == 0 and "ok: 11 shards" in check.stdout


def test_check_names_a_truncated_shard(tmp_path, colour):
    root, _ = colour
    out = tmp_path / "s"
    assert make_shards(root, out, "--shard-size", "5", "--splits", "val").returncode == 0
    shard = out / "val-0002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    check = run_make_shards("--out", str(out), "--check")
    assert check.returncode == 1, check.stderr
    assert check.stderr.strip().splitlines()[-1].startswith(f"error: shard {shard} differs")
    with pytest.raises(ShardError, match=rf"shard {shard} has 3000 bytes, its manifest says .*truncated"):
        build_loader(_cfg(out), "val")


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_val_counts_every_sample_once_at_any_world_size(colour, backend):
    root, out = colour
    folder = build_loader(DataConfig(root=str(root), backend="torchvision", num_workers=0, img_size=32), "val")
    ids, names = [], []
    for world in (1, 2, 3, 4):
        per_rank = []
        for rank in range(world):
            # val_shards null: the val shards of the make_shards folder given as train_shards
            loader = build_loader(_cfg(out, backend, val_shards=None), "val", rank=rank, world_size=world)
            got = [i for x, _ in loader for i in colour_ids(x, DataConfig().mean, STD)]
            assert len(got) == loader.num_samples == len(loader.paths)
            per_rank.append((got, loader.paths))
            loader.close()
        ids.append([i for got, _ in per_rank for i in got])
        names.append([p for _, paths in per_rank for p in paths])
    assert all(i == ids[0] for i in ids) and sorted(ids[0]) == list(range(23))
    assert all(n == names[0] for n in names)
    # the names keep each file's base name (ReaL scoring reads it) and the shard it lies in
    assert [Path(n).name.replace(".jpg", ".JPEG") for n in names[0]] == [Path(p).name for p in folder.paths]
    assert all(".tar/" in n for n in names[0])
    folder.close()


def test_val_from_shards_equals_the_folder_and_real_reads_the_names(colour, tmp_path):
    root, out = colour
    cfg = DataConfig(root=str(root), backend="torchvision", batch_size=4, num_workers=0, img_size=32)
    folder = torch.cat([x for x, _ in build_loader(cfg, "val")])
    shards = torch.cat([x for x, _ in build_loader(_cfg(out), "val")])
    assert torch.equal(folder, shards)
    # ReaL: ImageNet val file names survive as the sample names' base names
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    for i in (1, 2, 3):
        (tmp_path / "val" / "n01440764" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(
            (root / "val" / "n01440764" / "img_0000.JPEG").read_bytes()
        )
    assert make_shards(tmp_path, tmp_path / "s", "--splits", "val").returncode == 0
    loader = build_loader(_cfg(tmp_path / "s"), "val")
    rows = real_label_rows([[5], [6, 7], []], loader.paths, num_classes=10)
    assert rows.tolist() == [[5, -1], [6, 7], [-1, -1]]


def test_both_backends_read_the_same_train_batches_and_resume_exactly(colour):
    _, out = colour
    batches = {}
    for backend, extra in (("torchvision", {}), ("dali", {}), ("dali", {"dali_resize": "graph"})):
        for world, rank in ((1, 0), (2, 1)):
            loader = build_loader(_cfg(out, backend, **extra), "train", seed=5, rank=rank, world_size=world)
            loader.set_epoch(3)
            whole = [(x.clone(), y.clone()) for x, y in loader]
            loader.set_epoch(3, start_batch=2)
            resumed = list(loader)
            assert len(whole) == len(loader) and len(resumed) == len(whole) - 2
            for (a, la), (b, lb) in zip(whole[2:], resumed):
                assert torch.equal(a, b) and torch.equal(la, lb)
            batches[(backend, str(extra), world)] = whole
            if backend == "dali":  # only the last pipeline's index files are kept, and none after close()
                assert 0 < len(os.listdir(loader._tmp)) <= len(loader._shards.counts)
            loader.close()
            assert backend != "dali" or not os.path.exists(loader._tmp)
    for world in (1, 2):
        tv = batches[("torchvision", "{}", world)]
        for key in (("dali", "{}", world), ("dali", str({"dali_resize": "graph"}), world)):
            for (a, la), (b, lb) in zip(tv, batches[key]):
                assert torch.equal(la, lb)
                assert colour_ids(a, DataConfig().mean, STD) == colour_ids(b, DataConfig().mean, STD)
                limit = 0.1 if key[1] == "{}" else 1.0  # DALI's own resize: within a grey level of PIL's
                assert (grey_level_diff(a, b, STD) < limit).all(), key
    # ranks of world size 2 take disjoint blocks of the same epoch order as world size 1
    ids = lambda bs: [i for x, _ in bs for i in colour_ids(x, DataConfig().mean, STD)]  # noqa: E731
    rank1 = ids(batches[("torchvision", "{}", 2)])
    assert rank1 == ids(batches[("torchvision", "{}", 1)])[14:26]  # 29 // 2 = 14 per rank, 3 batches


def test_torchvision_skips_a_corrupt_jpeg_inside_a_shard_and_dali_names_it(tmp_path, caplog):
    write_noise_split(tmp_path, "train", 12)
    write_noise_split(tmp_path, "val", 6, seed=1)
    bad = tmp_path / "val" / "n01443537" / "img_0001.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: a header and no image data
    out = tmp_path / "s"
    assert make_shards(tmp_path, out, "--shard-size", "4").returncode == 0
    with caplog.at_level(logging.WARNING):
        loader = build_loader(_cfg(out), "val")
        assert sum(len(y) for _, y in loader) == 6 and loader.skipped == 1
    name = f"{out / 'val-0000.tar'}/n01443537/img_0001.jpg"
    assert loader.skipped_paths == [name] and name in caplog.text
    with pytest.raises(RuntimeError, match=rf"undecodable file\(s\): \['{name}'\]"):
        list(build_loader(_cfg(out, "dali"), "val"))


def test_hub_style_shards_without_manifest_are_indexed_from_the_tars(tmp_path):
    """Flat keys, a brace pattern, labels only in .cls, no manifest: classes are ImageNet-1k's."""
    paths = write_colour_split(tmp_path / "src", "val", 7)
    for s, chunk in enumerate((paths[:4], paths[4:])):
        with tarfile.open(tmp_path / f"imagenet1k-validation-{s:02d}.tar", "w") as tar:
            for i, path in enumerate(chunk):
                key = f"{4 * s + i:06d}"  # keys say nothing; the json keeps the file name
                tar.add(path, f"{key}.jpeg")
                (tmp_path / "c").write_text(str(900 + 4 * s + i))
                tar.add(tmp_path / "c", f"{key}.cls")
                (tmp_path / "j").write_text(json.dumps({"filename": f"ILSVRC2012_val_{4 * s + i + 1:08d}.JPEG"}))
                tar.add(tmp_path / "j", f"{key}.json")
    pattern = str(tmp_path / "imagenet1k-validation-{00..01}.tar")
    loader = build_loader(_cfg(pattern, val_shards=pattern), "val")
    assert loader.classes == list(IMAGENET1K_WNIDS)
    assert [int(t) for _, y in loader for t in y] == list(range(900, 907)) == loader.targets
    assert colour_ids(torch.cat([x for x, _ in loader]), DataConfig().mean, STD) == list(range(7))
    assert real_label_rows([[k] for k in range(7)], loader.paths, num_classes=1000)[:, 0].tolist() == list(range(7))
    dali = build_loader(_cfg(pattern, "dali", val_shards=pattern), "val")
    assert [int(t) for _, y in dali for t in y] == list(range(900, 907))
    # indexed once in place (make_shards.py --index-val): the same samples, names and labels, without a scan
    done = run_make_shards("--out", str(tmp_path), "--index-val", "imagenet1k-validation-{00..01}.tar")
    assert done.returncode == 0 and "val: 7 samples in 2 shards indexed" in done.stdout, done.stderr
    indexed = build_loader(_cfg(pattern, val_shards=pattern), "val")
    assert indexed.paths == loader.paths and indexed.targets == loader.targets
    assert torch.equal(torch.cat([x for x, _ in indexed]), torch.cat([x for x, _ in loader]))
    assert run_make_shards("--out", str(tmp_path), "--check").returncode == 0
    (tmp_path / "manifest.json").unlink()
    truncated = tmp_path / "imagenet1k-validation-01.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    with pytest.raises(ShardError, match=rf"shard {truncated} is truncated"):
        build_loader(_cfg(pattern, val_shards=pattern), "val")


# --- train.py / evaluate.py on shards (subprocesses) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_shards(train_folder, tmp_path_factory) -> Path:
    """test_train's class-coloured folder (32 train / 12 val, 4 classes) as shards of 5: 7 uneven train shards."""
    out = tmp_path_factory.mktemp("train_shards")
    assert make_shards(train_folder, out, "--shard-size", "5").returncode == 0
    return out


def _wds(shards: Path, backend: str) -> dict:
    extra = {"data.format": "wds", "data.train_shards": str(shards), "data.val_shards": str(shards)}
    if backend == "dali":  # the graph path: what a GPU runs, here with CPU decoding
        extra.update({"data.backend": "dali", "data.dali_resize": "graph", "data.num_workers": 1})
    return extra


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_kill_9_mid_epoch_then_resume_auto_from_shards_is_bit_exact(tmp_path, train_folder, folder_shards, backend):
    extra = {**_wds(folder_shards, backend), "trainer.save_every_steps": 3}
    reference = test_train._train(tmp_path / "ref", train_folder, **extra)
    assert reference.returncode == 0, reference.stdout[-3000:]
    epochs = test_train._records(tmp_path / "ref", "epoch")  # validated from the val shards after each epoch
    assert [e["epoch"] for e in epochs] == [0, 1] and all(0 <= e["val_top1"] <= 100 for e in epochs)
    run = tmp_path / "run"
    proc = test_train._start(run, train_folder, **extra)
    test_train._wait_until_step(proc, run, 11)  # mid second epoch (8 steps of 4 per epoch), after the save at step 9
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert test_train._last(run)["global_step"] < 16, "kill came too late"
    resumed = test_train._train(run, train_folder, **extra, resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'last.pth'}" in resumed.stdout
    final, ref = test_train._last(run), test_train._last(tmp_path / "ref")
    assert final["global_step"] == ref["global_step"] == 16
    test_train._assert_same_weights(final, ref)
    assert [r["step"] for r in test_train._records(run, "train")] == list(range(1, 17))


@pytest.mark.slow
def test_train_py_names_a_truncated_shard_in_one_error_line(tmp_path, train_folder, folder_shards):
    shards = tmp_path / "s"
    shards.mkdir()
    for f in folder_shards.iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    bad = shards / "train-0004.tar"
    bad.write_bytes(bad.read_bytes()[:4096])
    cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in _env().items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [*cmd, *test_train._overrides(train_folder, **_wds(shards, "torchvision"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shard {bad} has 4096 bytes" in errors[0], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("nproc, backend", [(2, "torchvision"), (3, "dali")])
def test_torchrun_evaluation_from_five_uneven_shards_equals_the_folder(
    tmp_path, eval_folder, eval_checkpoint, nproc, backend
):
    shards = tmp_path / "shards"
    assert make_shards(eval_folder, shards, "--shard-size", "23", "--splits", "val").returncode == 0
    assert [s["samples"] for s in json.loads((shards / "manifest.json").read_text())["splits"]["val"]["shards"]] == [
        23, 23, 23, 23, 9,
    ]  # fmt: skip
    one, _ = test_evaluate_cli._evaluate(tmp_path / "folder", eval_folder, eval_checkpoint, f"data.backend={backend}")
    wds = ("data.format=wds", f"data.val_shards={shards}", f"data.backend={backend}")
    many, _ = test_evaluate_cli._evaluate(tmp_path / "wds", eval_folder, eval_checkpoint, *wds, nproc=nproc)
    assert many["count"] == one["count"] == test_evaluate_cli.NUM_IMAGES and many["world_size"] == nproc
    assert (many["top1"], many["top5"]) == (one["top1"], one["top5"])
    assert many["per_class_count"] == one["per_class_count"]
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_member_reader_is_exact_under_threads_and_few_open_files(colour):
    """DALI's header threads read samples at once: positional reads and a lock around the open-file cache (here
    two files for 6 shards, so descriptors are closed and reopened all the time) give every thread its bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from res2net.data.loader_wds import load_split
    from res2net.data.shards import MemberReader

    _, out = colour
    shards = load_split(_cfg(out), "train")
    want = {}
    for path in shards.paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    want[f"{path}/{member.name}"] = tar.extractfile(member).read()
    reader = MemberReader(shards, max_open=2)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(shards)), 20))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (i, reader.read(int(i)), reader.open(int(i)).read(7)), order))
    assert all(data == want[shards.names[i]] and head == data[:7] for i, data, head in got)
    assert reader.opened > len(shards.paths)  # the cache really evicted
    reader.close()


def test_dali_removes_the_index_folders_of_killed_processes(colour):
    """A SIGKILLed run cannot delete its DALI index folder; the next DALI shard loader on the machine does."""
    import tempfile

    _, out = colour
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"res2net-wds-idx-{dead.pid}-test"
    alive = Path(tempfile.gettempdir()) / f"res2net-wds-idx-{os.getpid()}-test"
    for folder in (orphan, alive):
        folder.mkdir()
        (folder / "b1-0.idx").write_text("v1.2 0\n")
    loader = build_loader(_cfg(out, "dali"), "val")
    assert not orphan.exists() and alive.exists()
    loader.close()
    (alive / "b1-0.idx").unlink()
    alive.rmdir()
