"""Every training preset of configs/experiment/ trains end to end in every backend, and its checkpoint evaluates.

The presets are discovered from the folder, so a new one is covered without editing this file. A file there is a
sweep, not a training preset, when it declares what a multirun launches: ``hydra.sweeper.params`` (the ablation_*
files: one job per value, run with ``train.py -m``) or ``hydra.mode: MULTIRUN``. Every other file is a recipe that
trains on its own.

Each preset runs in-process (``train_job.train``, as test_recipes / test_engine_train do) on a tiny folder of real
JPEGs in the torchvision backend and DALI's 'torch' and 'graph' paths (CPU decoding, ``data.dali_resize``), for two
short epochs: a few optimizer steps, a validation pass and a checkpoint per epoch. Only what sets the run's size is
overridden, the same way for every preset (SHRINK: data, batch, resolution, epochs, a 4-layer model); a preset's
resolution knobs keep their meaning at the tiny scale (the train / test size ratio; progressive resizing still
changes the size between the two epochs). Everything else the preset states (optimizer, schedule, loss, mixup,
augmentation policy, interpolation, EMA, accumulation, drop path, repeated augmentation, ...) is left as it is,
and the run's config.yaml is checked to hold it. The last checkpoint is then evaluated through evaluate.py's own
config (configs/eval.yaml composed) and library call, which must reproduce the trainer's last validation.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from test_data_helpers import write_noise_split

import res2net
from res2net.config import register_configs, to_dict
from res2net.engine.eval_job import evaluate_checkpoint
from res2net.engine.train_job import train
from res2net.engine.train_loop import optimizer_steps_per_epoch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
EXPERIMENTS = CONFIGS / "experiment"


def is_sweep(path: Path) -> bool:
    """True for a file that only makes sense under ``train.py -m``: it names the values a multirun sweeps."""
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
    return bool((hydra.get("sweeper") or {}).get("params")) or hydra.get("mode") == "MULTIRUN"


PRESETS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if not is_sweep(p))
BACKENDS = {
    "torchvision": ["data.backend=torchvision"],
    "dali-torch": ["data.backend=dali", "data.dali_decoder=cpu", "data.dali_resize=torch"],
    "dali-graph": ["data.backend=dali", "data.dali_decoder=cpu", "data.dali_resize=graph"],
}
TRAIN_IMAGES, VAL_IMAGES, BATCH, EPOCHS, PX = 16, 8, 4, 2, 32
# Applied to every preset alike: what sets the size of the run, nothing that sets how it trains.
SHRINK = [
    f"data.batch_size={BATCH}",
    "data.num_workers=0",  # torchvision: decode in this process; DALI: one CPU thread
    f"data.img_size={PX}",
    f"schedule.epochs={EPOCHS}",
    "model.layers=[1,1,1,1]",
    "model.base_width=4",
    "trainer.device=cpu",
    "trainer.log_interval=1",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: next to DALI's thread (and on a shared 2-core machine) a second OpenMP thread spins and
    made these runs up to 30x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("presets")
    write_noise_split(root, "train", TRAIN_IMAGES, seed=0)
    write_noise_split(root, "val", VAL_IMAGES, seed=1)
    return root


def _compose(config_name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _scaled_overrides(cfg, root: Path) -> list[str]:
    """The preset's size-bound knobs at the tiny scale: val keeps its ratio to train, progressive resizing ramps from
    PX to 2 x PX between the two epochs, a warm-up takes the first epoch, and a preset that starts from the released
    weights (model.pretrained) starts from a file of the reduced model instead (model.init_checkpoint, which wins
    over it: no network here), with ImageNet's 1,000-class head, so its classifier is re-initialised as in real use."""
    data, out = cfg.data, []
    if cfg.schedule.warmup_epochs > 0:
        out.append(f"schedule.warmup_epochs={EPOCHS / 2}")
    if cfg.model.pretrained:
        weights = root / f"{cfg.model.name}-reduced-in1k.pth"
        if not weights.exists():
            torch.save(res2net.create_model(cfg.model.name, layers=[1, 1, 1, 1], base_width=4).state_dict(), weights)
        out.append(f"model.init_checkpoint={weights}")
    if data.val_img_size is not None:
        out.append(f"data.val_img_size={round(PX * data.val_img_size / data.img_size)}")
    if data.progressive_sizes is not None:
        out += [f"data.progressive_sizes=[{PX},{2 * PX}]", f"data.progressive_step={PX}"]
        out.append("data.progressive_epochs=[0,1]")
    return out


def shrunk_config(preset: str, backend: str, root: Path):
    common = [f"experiment={preset}", f"data.root={root}", *BACKENDS[backend], *SHRINK]
    return _compose("train", [*common, *_scaled_overrides(_compose("train", common), root)])


def _leaves(node, prefix=""):
    """{dotted key: value} of a nested mapping."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def stated_knobs(preset: str) -> dict:
    """Every value the preset states: its own keys and those of the group files its defaults list selects (the
    preset's keys win), without the hydra block."""
    doc = yaml.safe_load((EXPERIMENTS / f"{preset}.yaml").read_text()) or {}
    stated = {}
    for entry in doc.pop("defaults", []):
        for key, option in entry.items():  # "override /optim": "lamb"
            group = key.split("/")[-1]
            stated.update(_leaves(yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}, f"{group}."))
    doc.pop("hydra", None)
    stated.update(_leaves(doc))
    return stated


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_discovery_tells_the_sweeps_from_the_training_presets():
    sweeps = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if is_sweep(p))
    assert sweeps and all(name.startswith("ablation_") for name in sweeps)
    assert {"rsb_a1", "rsb_a2", "rsb_a3", "tv_recipe", "fast", "paper_release", "debug"} <= set(PRESETS)
    assert not set(sweeps) & set(PRESETS)


def test_shrinking_leaves_every_stated_knob_but_the_size_alone(tmp_path):
    """The override list touches only size keys: for each preset, every value it states that is not a size key
    survives composition with SHRINK (what the end-to-end runs then check in each run's config.yaml)."""
    for preset in PRESETS:
        cfg = to_dict(shrunk_config(preset, "dali-graph", tmp_path))
        flat = _leaves(cfg)
        kept = {k: v for k, v in stated_knobs(preset).items() if not _is_size_key(k)}
        assert kept, preset
        assert {k: flat[k] for k in kept} == kept, preset


def _is_size_key(key: str) -> bool:
    overridden = {o.split("=")[0] for o in SHRINK} | {"data.root", "data.backend", "data.val_img_size"}
    overridden |= {"data.progressive_sizes", "data.progressive_epochs", "data.progressive_step"}
    overridden |= {"schedule.warmup_epochs", "model.init_checkpoint"}
    return key in overridden


def _evaluate(run_cfg, checkpoint: Path, out_dir: Path, use_ema: bool) -> dict:
    """evaluate.py's path: configs/eval.yaml composed, then the library call its main() makes, on the data settings
    the run validated with."""
    cfg = _compose("eval", [f"model={run_cfg.model.name}", f"checkpoint={checkpoint}", "device=cpu", "progress=false"])
    cfg.data = run_cfg.data
    cfg.use_ema = use_ema
    return evaluate_checkpoint(cfg, out_dir)


@pytest.mark.slow  # the matrix: ~1.5 s per run and evaluation on 2 cores, ~27 runs
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_validates_checkpoints_and_evaluates(preset, backend, tiny_folder, tmp_path):
    cfg = shrunk_config(preset, backend, tiny_folder)
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir)

    steps = EPOCHS * optimizer_steps_per_epoch(TRAIN_IMAGES // BATCH, cfg.trainer.accum_steps)
    assert (result.status.value, result.epoch, result.global_step) == ("finished", EPOCHS, steps)
    recorded = _leaves(yaml.safe_load((run_dir / "config.yaml").read_text()))
    knobs = {k: v for k, v in stated_knobs(preset).items() if not _is_size_key(k)}
    assert {k: recorded[k] for k in knobs} == knobs  # the preset's recipe is what ran
    train_losses = [r["loss"] for r in _records(run_dir, "train")]
    assert len(train_losses) == steps and all(math.isfinite(x) for x in train_losses)
    epochs = _records(run_dir, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(EPOCHS))
    ema = cfg.trainer.ema_decay > 0
    assert all(("val_top1_ema" in e) == ema for e in epochs)

    last = run_dir / "checkpoints" / "last.pth"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == steps and (run_dir / "checkpoints" / "best.pth").is_file()
    for use_ema, suffix in ((False, ""), (True, "_ema"))[: 1 + ema]:
        out = _evaluate(cfg, last, tmp_path / f"eval{suffix}", use_ema)
        assert out["count"] == VAL_IMAGES
        assert json.loads((tmp_path / f"eval{suffix}" / "results.json").read_text())["count"] == VAL_IMAGES
        # evaluate.py folds BatchNorm and runs channels_last: the same numbers within float tolerance, one image of
        # VAL_IMAGES may sit on a near-tie of the barely trained model
        assert out["loss"] == pytest.approx(epochs[-1][f"val_loss{suffix}"], rel=1e-3)
        assert out["top1"] == pytest.approx(epochs[-1][f"val_top1{suffix}"], abs=100 / VAL_IMAGES + 1e-9)


def test_a_preset_file_added_later_is_picked_up(tmp_path):
    """Discovery is by file: a new recipe file is a training preset, a new file with sweeper params a sweep."""
    recipe, sweep, multirun = (tmp_path / f"{name}.yaml" for name in ("recipe", "sweep", "multirun"))
    recipe.write_text("# @package _global_\nhydra:\n  run:\n    dir: elsewhere\noptim:\n  lr: 0.2\n")
    sweep.write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      optim.lr: 0.1,0.2\n")
    multirun.write_text("# @package _global_\nhydra:\n  mode: MULTIRUN\n")
    assert [is_sweep(p) for p in (recipe, sweep, multirun)] == [False, True, True]
