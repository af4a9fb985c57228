"""Fine-tuning: initialising from weights with a new head, freezing, per-group learning rates, the val split, and
train.py end to end (init_checkpoint, model.pretrained through a local hub, resume_allow)."""

import copy
import csv
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import hub_server  # noqa: F401  (fixture)
from omegaconf import OmegaConf
from safetensors.torch import save
from test_data_helpers import write_noise_split
from test_engine_train import _cfg  # the debug experiment on 32 synthetic images

import res2net
from res2net.config import OptimConfig
from res2net.data.split import split_samples, write_split
from res2net.engine.finetune import depth_of, freeze, lr_scales
from res2net.engine.optim import build_optimizer
from res2net.engine.schedule import set_lr
from res2net.engine.train_job import train
from res2net.errors import CheckpointError
from res2net.models.hub import HUB_REPOS
from res2net.models.loading import CLASSIFIER_KEYS, initialise
from res2net.predictor import expand_inputs

REPO = Path(__file__).resolve().parents[2]
TINY = dict(base_width=4, layers=[1, 1, 1, 1], scale=2)
BACKBONE = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def _tiny(num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return res2net.create_model("res2net50_26w_4s", num_classes=num_classes, **TINY)


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        model.train()
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, model.num_classes, (4,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_frozen_parameters_stay_unchanged_and_are_not_in_the_optimizer():
    model = _tiny(5)
    frozen = freeze(model, "layer2", bn_eval=True)
    assert frozen and {depth_of(n) for n in frozen} == {0, 1, 2}
    before = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(model, OmegaConf.structured(OptimConfig(lr=0.5)), 256)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert not in_optimizer & {id(params[n]) for n in frozen}
    assert {id(p) for n, p in params.items() if n not in frozen} == in_optimizer
    _steps(model, optimizer)
    after = model.state_dict()
    for key in before:  # weights and BatchNorm running statistics up to layer2 unchanged, the rest trained
        if depth_of(key) <= 2:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    assert not model.layer2[0].bn1.training and model.layer3[0].bn1.training  # model.train() kept them in eval
    assert not copy.deepcopy(model).bn1.training  # the EMA's copy too


def test_frozen_batchnorm_can_keep_training_mode():
    model = _tiny(5)
    freeze(model, "stem", bn_eval=False)
    stats = model.bn1.running_mean.clone()
    _steps(model, build_optimizer(model, OmegaConf.structured(OptimConfig(lr=0.5)), 256), 1)
    assert model.bn1.training and not torch.equal(stats, model.bn1.running_mean)
    assert not model.conv1.weight.requires_grad


def test_freeze_backbone_leaves_only_the_classifier():
    model = _tiny(5)
    freeze(model, "backbone")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(CLASSIFIER_KEYS)
    with pytest.raises(ValueError, match="trainer.freeze='layer9'.*none \\| stem"):
        freeze(model, "layer9")


@pytest.mark.parametrize("no_decay", [False, True])
def test_per_group_learning_rates_and_weight_decay(no_decay):
    model = _tiny(5)
    cfg = OptimConfig(lr=0.1, weight_decay=1e-4, no_decay_norm_bias=no_decay, head_lr_mult=10.0, layer_decay=0.5)
    optimizer = build_optimizer(model, OmegaConf.structured(cfg), 512)
    set_lr(optimizer, 0.05)  # what the schedule does every step
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group, depth = group_of[id(p)], depth_of(name)
        expected = 0.05 * 0.5 ** (5 - depth) * (10.0 if name.startswith("fc.") else 1.0)
        assert group["lr"] == pytest.approx(expected), name
        assert group["weight_decay"] == (0.0 if no_decay and p.ndim <= 1 else 1e-4), name
    assert lr_scales(model, 1.0, 1.0) is None  # both off: the optimizer's groups are the former ones
    assert len(build_optimizer(model, OmegaConf.structured(OptimConfig()), 256).param_groups) == 1


def _train_checkpoint(path: Path, model: torch.nn.Module, classes: list[str]) -> Path:
    torch.save({"model": model.state_dict(), "classes": classes, "config": {"model": {"name": "x"}}}, path)
    return path


def test_initialise_from_a_checkpoint_with_other_classes(tmp_path, caplog):
    source = _tiny(10, seed=1)
    file = _train_checkpoint(tmp_path / "last.pth", source, [f"c{i}" for i in range(10)])
    target = _tiny(3, seed=2)
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k in CLASSIFIER_KEYS}
    with caplog.at_level(logging.INFO, logger="res2net.models.loading"):
        record = initialise(target, str(file))
    assert record.reinitialised == CLASSIFIER_KEYS
    assert record.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert "re-initialised fc.weight, fc.bias" in caplog.text
    for key, value in target.state_dict().items():  # the backbone is the source's, the head the fresh one
        expected = fresh_head[key] if key in CLASSIFIER_KEYS else source.state_dict()[key]
        assert torch.equal(value, expected), key
    # Same size but other class names: a new head as well; the same names: the source's head.
    same_size = _tiny(10, seed=3)
    assert initialise(same_size, str(file), classes=[f"d{i}" for i in range(10)]).reinitialised == CLASSIFIER_KEYS
    assert initialise(same_size, str(file), classes=[f"c{i}" for i in range(10)]).reinitialised == ()
    assert torch.equal(same_size.fc.weight, source.fc.weight)


def test_initialise_refuses_another_architecture_in_one_line(tmp_path):
    file = _train_checkpoint(tmp_path / "other.pth", _tiny(10), [])
    torch.manual_seed(0)
    wider = res2net.create_model("res2net50_26w_4s", num_classes=10, base_width=8, layers=[1, 1, 1, 1], scale=2)
    with pytest.raises(CheckpointError) as err:
        initialise(wider, str(file))
    assert "\n" not in str(err.value) and "of another shape layer1.0.conv1.weight" in str(err.value)


def test_reset_classifier():
    model = _tiny(10)
    model.reset_classifier(4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4) and model.num_classes == 4
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


def test_val_split_is_deterministic_stratified_and_disjoint():
    train_dir = "/data/train"
    sizes = {0: 10, 1: 7, 2: 1, 3: 40}
    samples = [(f"{train_dir}/c{label}/{i:03d}.jpg", label) for label, n in sizes.items() for i in range(n)]
    train, val = split_samples(samples, 0.2, train_dir)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_samples(shuffled, 0.2, train_dir)
    assert sorted(val) == sorted(val2) and sorted(train) == sorted(train2)  # not a function of order or seed
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert sorted(train + val) == sorted(samples)
    per_class = {label: sum(1 for _, lab in val if lab == label) for label in sizes}
    assert per_class == {0: 2, 1: 1, 2: 0, 3: 8}  # round(0.2 n), at least one of a class of two or more
    # Another fraction of the same files holds out a superset (the ranking is fixed per file).
    assert {p for p, _ in val} <= {p for p, _ in split_samples(samples, 0.5, train_dir)[1]}


# --- train.py end to end ------------------------------------------------------------------------------------


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONPATH=str(REPO), **extra)


def _train(run_dir: Path, root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.run.dir={run_dir}",
        "data=folder",
        f"data.root={root}",
        "data.img_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.base_width=4",
        "model.layers=[1,1,1,1]",
        "schedule.epochs=1",
        "trainer.log_interval=1",
        *overrides,
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or _env())
    return proc


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """Another task: two classes with their own names, 24 train and 8 val images."""
    root = tmp_path_factory.mktemp("pets")
    write_noise_split(root, "train", 24, seed=3, wnids=("cat", "dog"))
    write_noise_split(root, "val", 8, seed=4, wnids=("cat", "dog"))
    return root


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.split(".")[0] in BACKBONE}


@pytest.mark.slow
def test_train_init_checkpoint_new_head_frozen_backbone_and_resume_allow(tmp_path, pets, image_folder):
    source_run, run = tmp_path / "source", tmp_path / "finetune"
    first = _train(source_run, image_folder)
    assert first.returncode == 0, first.stdout[-3000:]
    source_file = source_run / "checkpoints" / "last.pth"
    source = torch.load(source_file, weights_only=True)
    # Another task (2 classes, the source 3): the head is new, the frozen backbone stays the source's.
    proc = _train(run, pets, f"model.init_checkpoint={source_file}", "trainer.freeze=backbone")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "re-initialised fc.weight, fc.bias" in proc.stdout
    ckpt = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    for key, value in _backbone(source["model"]).items():
        assert torch.equal(ckpt["model"][key], value), key
    assert not torch.equal(ckpt["model"]["fc.weight"], source["model"]["fc.weight"])
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["model"]["fc.weight"].shape[0] == 2
    sha = hashlib.sha256(source_file.read_bytes()).hexdigest()
    assert ckpt["config"]["init"] == {"source": str(source_file), "sha256": sha}
    assert yaml.safe_load((run / "config.yaml").read_text())["init"]["sha256"] == sha
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3  # a fresh position: 24 images / 8, one epoch
    # A finished run continued on purpose: refused without resume_allow, then extended with it.
    refused = _train(run, pets, "resume=auto", "schedule.epochs=2", f"model.init_checkpoint={source_file}")
    assert refused.returncode == 1 and "schedule.epochs: checkpoint 1 vs now 2" in refused.stdout
    more = _train(
        run,
        pets,
        "resume=auto",
        "schedule.epochs=2",
        "resume_allow=[schedule.epochs]",
        f"model.init_checkpoint={source_file}",
        "trainer.freeze=backbone",
    )
    assert more.returncode == 0, more.stdout[-3000:]
    assert "schedule.epochs: 1 -> 2" in more.stdout and "no longer the uninterrupted" in more.stdout
    assert "re-initialised" not in more.stdout  # resume=auto wins over init_checkpoint
    assert torch.load(run / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_train_pretrained_through_a_local_hub(tmp_path, image_folder, hub_server):  # noqa: F811
    torch.manual_seed(0)
    weights = res2net.create_model("res2net50_26w_4s", num_classes=1000, **TINY).state_dict()
    hub_server.repos[HUB_REPOS["res2net50_26w_4s"]] = {"model.safetensors": save(weights)}
    env = _env(
        RES2NET_CACHE=str(tmp_path / "cache"),
        HF_ENDPOINT=hub_server.base,
        RES2NET_MIRRORS=f"{hub_server.base}/no-such-mirror",  # the .pth locations fail: the hub copy is used
    )
    run = tmp_path / "run"
    proc = _train(run, image_folder, "model.scale=2", "model.pretrained=true", "trainer.freeze=layer4", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "re-initialised fc.weight, fc.bias (the source has 1000 classes" in proc.stdout
    ckpt = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    for key, value in _backbone(weights).items():
        assert torch.equal(ckpt["model"][key], value), key
    assert ckpt["config"]["init"]["source"] == "res2net50_26w_4s"
    assert ckpt["config"]["model"]["pretrained"] is True


@pytest.mark.slow
def test_val_split_recorded_and_reused_by_evaluate(tmp_path):
    root = tmp_path / "only_train"  # no val/ folder
    write_noise_split(root, "train", 30, seed=5, wnids=("ant", "bee", "fly"))
    run = tmp_path / "run"
    proc = _train(run, root, "data.val_split=0.2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 classes, 24 train / 6 val images" in proc.stdout and "ant: 8 train, 2 val" in proc.stdout
    split = json.loads((run / "split.json").read_text())
    assert split["val_split"] == 0.2 and len(split["val"]) == 6
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={run / 'checkpoints' / 'last.pth'}", "data=folder"]
    cmd += [
        f"data.root={root}",
        "data.num_workers=0",
        "save_predictions=true",
        "progress=false",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        evaluated = sorted(os.path.relpath(r["path"], root / "train") for r in csv.DictReader(f))
    assert evaluated == split["val"]  # the run's own held-out images, found again without data.val_split
    # predict.py takes the run's split.json as its input: the same images, the same top-1 as evaluate.py's.
    predicted = tmp_path / "predicted.json"
    cmd = [sys.executable, str(REPO / "scripts" / "predict.py"), str(run / "checkpoints" / "last.pth")]
    proc = subprocess.run(
        [*cmd, str(run / "split.json"), "--json", str(predicted), "--quiet"],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    by_path = {os.path.relpath(p["path"], root / "train"): p["names"][0] for p in json.loads(predicted.read_text())}
    with open(out / "predictions.csv", newline="") as f:
        top1 = {os.path.relpath(r["path"], root / "train"): split["classes"][int(r["top1"])] for r in csv.DictReader(f)}
    assert by_path == top1


def test_a_split_record_names_its_images_or_says_what_is_wrong(tmp_path):
    root = tmp_path / "data"
    write_noise_split(root, "train", 6, seed=1, wnids=("ant", "bee"))
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.JPEG"))]
    record = write_split(tmp_path, 0.5, str(root / "train"), ["ant", "bee"], samples[:2])
    assert expand_inputs([str(record)]) == [p for p, _ in samples[:2]]
    bad = tmp_path / "other" / "split.json"
    bad.parent.mkdir()
    for text, says in [
        ("{", "is not a split record"),
        ('{"train_dir": "x"}', "is not a split record"),
        (json.dumps({"train_dir": str(root / "train"), "val": ["../../etc/passwd"]}), "outside its train_dir"),
        (json.dumps({"train_dir": str(tmp_path / "moved"), "val": ["ant/a.JPEG"]}), "1 of its 1 val images"),
    ]:
        bad.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=says):
            expand_inputs([str(bad)])


def test_logged_lr_is_the_schedules_whatever_the_groups_multipliers(tmp_path):
    # The epoch record and the step records give the same lr: the schedule's, not the first group's (which under
    # layer_decay is the stem's, 1/32 of it here).
    cfg = _cfg("optim.layer_decay=0.5", "optim.head_lr_mult=3", "trainer.log_interval=1", "schedule.epochs=2")
    train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and len(set(steps.values())) > 2  # cosine: the lr moves
    for record in epochs:
        assert record["lr"] == steps[record["global_step"]], (record, steps)  # the epoch's last step
