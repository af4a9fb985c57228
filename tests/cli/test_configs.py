"""Config composition: every model and experiment composes into the typed schema, typos fail at start-up."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import res2net
from res2net.config import EvalConfig, TrainConfig, register_configs
from res2net.models import model_from_config, resolve_model_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _run_train(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_one_config_file_per_registered_model():
    assert MODELS == res2net.list_models()
    assert len(MODELS) == 9


def test_cfg_job_shows_the_paper_recipe_for_26w_8s(tmp_path):
    proc = _run_train("--cfg", "job", "model=res2net50_26w_8s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["model"]["name"] == "res2net50_26w_8s"
    assert job["model"]["scale"] is None  # the variant's value, filled in when the run starts
    resolved = resolve_model_config(job["model"])
    assert (resolved["scale"], resolved["base_width"]) == (8, 26)
    assert job["optim"]["lr"] == 0.1 and job["optim"]["momentum"] == 0.9
    assert job["optim"]["weight_decay"] == pytest.approx(1e-4) and job["optim"]["nesterov"] is False
    assert job["schedule"]["epochs"] == 100 and job["schedule"]["milestones"] == [30, 60, 90]
    assert job["data"]["backend"] == "dali" and job["data"]["batch_size"] == 64
    assert (job["data"]["img_size"], job["data"]["crop_pct"], job["data"]["interpolation"]) == (224, 0.875, "bilinear")
    assert job["loss"] == {"name": "ce", "label_smoothing": 0.0, "bce_target_thresh": None, "bce_sum": False}
    assert job["mixup"]["alpha"] == 0.0 and job["mixup"]["cutmix_alpha"] == 0.0 and job["distill"]["teacher"] == ""
    assert job["optim"]["name"] == "sgd" and job["trainer"]["accum_steps"] == 1 and job["schedule"]["warmup_lr"] == 0
    assert job["model"]["drop_path_rate"] is None and job["label_smoothing"] is None
    assert job["trainer"]["amp"] == "auto"  # bf16 on GPUs with native bf16
    assert not list(tmp_path.iterdir()), "--cfg job must not create a run directory"


@pytest.mark.parametrize("name", MODELS)
def test_every_model_composes_and_states_its_variant(name):
    cfg = _compose(f"model={name}")
    assert OmegaConf.get_type(cfg) is TrainConfig
    # The YAML names the variant and leaves its architecture to the variant table: building from the composed config
    # equals building by name alone.
    import torch

    with torch.device("meta"):
        composed = model_from_config(cfg.model)
        plain = res2net.create_model(name)
    assert cfg.model.name == name
    assert {k: v.shape for k, v in composed.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    assert OmegaConf.get_type(_compose(f"experiment={experiment}")) is TrainConfig


def test_paper_release_adds_label_smoothing_only():
    paper, release = _compose(), _compose("experiment=paper_release")
    assert paper.loss.label_smoothing == 0.0 and release.loss.label_smoothing == 0.1
    release.loss.label_smoothing = 0.0
    assert OmegaConf.to_container(paper) == OmegaConf.to_container(release)
    model = _compose("experiment=paper_release", "model=res2net50_26w_8s").model  # any variant
    assert resolve_model_config(model)["scale"] == 8


def test_cosine_schedule_and_knobs_compose():
    cfg = _compose("schedule=cosine", "schedule.warmup_epochs=5", "trainer.amp=bf16", "optim.no_decay_norm_bias=true")
    assert cfg.schedule.name.value == "cosine" and cfg.schedule.warmup_epochs == 5.0
    assert cfg.trainer.amp.value == "bf16" and cfg.optim.no_decay_norm_bias is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_step=3", "Key 'max_step' not in 'TrainerConfig'"),
        ("trainer.max_steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("trainer.amp=fp32", "Invalid value 'fp32', expected one of [auto, off, bf16, fp16]"),
        ("optim.lr=fast", "could not be converted to Float"),
        ("model=res2net51", "error: model=res2net51: configs/model/ has no res2net51.yaml"),  # one line (issue 21)
    ],
)
def test_bad_override_fails_at_startup_before_any_data(tmp_path, override, message):
    proc = _run_train(override, "data.root=/nonexistent/imagenet", cwd=tmp_path)
    assert proc.returncode == 2  # a usage error (res2net/errors.py)
    assert message in proc.stderr + proc.stdout
    assert "/nonexistent" not in proc.stderr  # failed in composition, before the data root was looked at
    assert not (tmp_path / "outputs").exists()


def test_typo_in_a_yaml_file_fails(tmp_path):
    bad = tmp_path / "configs"
    bad.mkdir()
    for item in CONFIGS.iterdir():
        (bad / item.name).symlink_to(item)
    (bad / "train.yaml").unlink()
    (bad / "train.yaml").write_text((CONFIGS / "train.yaml").read_text() + "\nlabel_smoothin: 0.1\n")
    register_configs()
    with initialize_config_dir(config_dir=str(bad), version_base="1.3"):
        with pytest.raises(Exception, match="label_smoothin"):
            compose(config_name="train")


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (
            isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)
        ):
            yield from _leaf_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_schema_key_is_read_by_the_engine():
    """A key nobody reads must not exist: each trainer/optim/schedule key is accessed as an attribute in the engine."""
    source = "\n".join(p.read_text() for p in (REPO / "res2net" / "engine").glob("*.py"))
    for key in _leaf_keys(TrainConfig):
        group, _, name = key.rpartition(".")
        if group in ("data", "model"):
            continue  # read by res2net.data (its owner's tests) and by res2net.models.model_from_config
        assert re.search(rf"\.{name}\b|\"{name}\"", source), f"config key {key} is not read by res2net/engine"


def test_run_dir_is_fixed_by_the_shared_launch_time(monkeypatch):
    monkeypatch.setenv("RES2NET_RUN_TIME", "0.0")
    monkeypatch.setenv("RANK", "0")
    cfg = _compose_with_hydra()
    assert cfg.hydra.run.dir.startswith("outputs/19")  # 1970-01-01 (or 1969 west of Greenwich)
    assert cfg.hydra.output_subdir == ".hydra"
    monkeypatch.setenv("RANK", "1")
    cfg = _compose_with_hydra()
    assert cfg.hydra.output_subdir is None
    assert cfg.hydra.job_logging.handlers.file.filename == "/dev/null"


def _compose_with_hydra():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    cfg.hydra.runtime.output_dir = "/tmp/run"  # set by Hydra at run time; the log file name refers to it
    cfg.hydra.job.name = "train"
    return cfg


def _config_copy(tmp_path) -> Path:
    """A copy of configs/ whose top files can be edited (the groups are symlinked)."""
    copy = tmp_path / "configs"
    copy.mkdir()
    for item in CONFIGS.iterdir():
        if item.suffix == ".yaml":
            (copy / item.name).write_text(item.read_text())
        else:
            (copy / item.name).symlink_to(item)
    return copy


def test_values_stated_in_eval_yaml_take_effect(tmp_path):
    """A value eval.yaml states wins over the schema's default (the schema comes first in its defaults list): every
    boolean option, stated flipped in a copy of eval.yaml, flips the composed config, and so does channels_last."""
    flags = [f.name for f in dataclasses.fields(EvalConfig) if isinstance(f.default, bool)]
    assert "fold_bn" in flags and "use_ema" in flags
    stated = {name: not getattr(EvalConfig, name) for name in flags}
    copy = _config_copy(tmp_path)
    text = (copy / "eval.yaml").read_text()
    assert not set(yaml.safe_load(text)) - {"defaults", "hydra"}  # states only what differs from the schema: nothing
    lines = "".join(f"{name}: {str(value).lower()}\n" for name, value in stated.items()) + "channels_last: false\n"
    (copy / "eval.yaml").write_text(text.replace("\nhydra:", "\n" + lines + "hydra:"))
    register_configs()
    with initialize_config_dir(config_dir=str(copy), version_base="1.3"):
        flipped = compose(config_name="eval")
    for name, value in stated.items():
        assert flipped[name] is value, name
    assert flipped.channels_last is False  # auto | true | false: a bool once set (it was the text "False")


def test_misspelt_experiment_fails_listing_the_available_ones(tmp_path):
    proc = _run_train("--cfg", "job", "experiment=paper_relase", cwd=tmp_path)
    assert proc.returncode == 2
    out = proc.stderr + proc.stdout
    assert "configs/experiment/ has no paper_relase.yaml; did you mean paper_release?" in out  # one line (issue 21)
    proc = _run_train("--cfg", "job", cwd=tmp_path)  # no experiment at all still composes
    assert proc.returncode == 0, proc.stderr
