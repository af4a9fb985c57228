"""The command line's checks, in process: every key known to the schema, values in range, one-line messages,
resume from the run directory's record, the run's ETA and the data set's name (issue 21, items 1, 3, 7, 9)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from res2net.config import (
    EvalConfig,
    TrainConfig,
    check_checkpoint_position,
    check_eval_config,
    check_group_choices,
    check_known_keys,
    check_train_config,
    recorded_run_config,
    register_configs,
)
from res2net.data.config import resolve_num_workers
from res2net.engine.checkpoint import weights_mismatch
from res2net.engine.metrics import RunEta, dataset_name
from res2net.errors import CheckpointError, ConfigError, exit_code
from res2net.launch import check_output_dirs
from res2net.models.pretrained import extract_state_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def _compose(config_name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.mark.parametrize(
    "config_name, override, key",
    [
        ("train", "+trainer.freeze_backbone=true", "trainer.freeze_backbone"),
        ("train", "+optim.lr_head=0.01", "optim.lr_head"),
        ("train", "+schedule.warmup=3", "schedule.warmup"),
        ("train", "+loss.focal=true", "loss.focal"),
        ("train", "+mixup.beta=1", "mixup.beta"),
        ("train", "+distill.teacher_path=x", "distill.teacher_path"),
        ("train", "+model.width=3", "model.width"),
        ("train", "+data.cache=true", "data.cache"),
        ("train", "+epochs=3", "epochs"),
        ("eval", "+tta_mode=flip", "tta_mode"),
        ("eval", "+data.cache=true", "data.cache"),
    ],
)
def test_an_appended_key_the_schema_does_not_know_is_refused_naming_it(config_name, override, key):
    cfg = _compose(config_name, override)
    schema = TrainConfig if config_name == "train" else EvalConfig
    with pytest.raises(ConfigError, match=rf"unknown config key {key}\b") as err:
        check_known_keys(cfg, schema)
    assert exit_code(err.value) == 2 and "\n" not in str(err.value)
    if config_name == "train":
        with pytest.raises(ConfigError, match=rf"unknown config key {key}\b"):
            check_train_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"unknown config key {key}\b"):
            check_eval_config(cfg)


def test_every_shipped_config_has_only_known_keys():
    for experiment in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        check_known_keys(_compose("train", f"experiment={experiment}"), TrainConfig)
    check_known_keys(_compose("eval"), EvalConfig)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.momentum=1.0"], r"optim.momentum=1.0 must be in \[0, 1\)"),
        (["schedule=cosine", "optim.lr=0.1", "schedule.min_lr=0.5"], r"schedule.min_lr=0.5 is above optim.lr=0.1"),
        (["schedule.milestones=[-1,30]"], r"schedule.milestones=\[-1, 30\] must be increasing epochs >= 0"),
        (["schedule.epochs=2", "schedule.warmup_epochs=5"], r"warmup_epochs=5.0 is longer than the run"),
        (["data.backend=synthetic", "data.synthetic_val_size=0"], r"data.synthetic_val_size=0 must be >= 1"),
        (["data.batch_size=1"], r"data.batch_size=1 must be >= 2 \(BatchNorm"),
        (["trainer.seed=1180591620717411303424"], r"trainer.seed=1180591620717411303424 must be in \[0, 2147483647\]"),
        (["data.img_size=100000"], r"data.img_size=100000 must be in \[1, 4096\]"),
        (["data.val_img_size=0"], r"data.val_img_size=0 must be in \[1, 4096\]"),
        (["data.mean=[nan,0,0]"], r"data.mean\[0\]=nan must be a finite number"),
        (["data.num_workers=-1"], r"data.num_workers=-1 must be >= 0"),
    ],
)
def test_a_nonsense_value_is_refused_at_start_up_with_the_allowed_range(overrides, message):
    cfg = _compose("train", *overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_train_config(cfg)
    assert exit_code(err.value) == 2 and "\n" not in str(err.value)


def test_evaluation_checks_its_data_values_in_the_same_place():
    with pytest.raises(ConfigError, match=r"data.mean\[1\]=nan"):
        check_eval_config(_compose("eval", "data.mean=[0,nan,0]"))
    with pytest.raises(ConfigError, match=r"data.img_size=100000"):
        check_eval_config(_compose("eval", "data.img_size=100000"))
    check_eval_config(_compose("eval", "data.batch_size=1"))  # no BatchNorm statistics in evaluation


def test_the_shipped_recipes_still_pass_the_checks():
    for experiment in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        check_train_config(_compose("train", f"experiment={experiment}"))


def test_num_workers_defaults_to_this_processes_share_of_the_cpus_and_is_lowered_to_them(monkeypatch, caplog):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers(None) == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpus))
    assert resolve_num_workers(None) == 1
    assert resolve_num_workers(0) == 0
    with caplog.at_level("WARNING"):
        assert resolve_num_workers(cpus + 60) == cpus
    assert f"data.num_workers={cpus + 60} is more than the {cpus} CPUs" in caplog.text
    assert _compose("train", "data=folder").data.num_workers is None  # the shipped default is the machine's


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for arg in (f"hydra.run.dir={a_file}/run", f"hydra.run.dir={a_file}", f"hydra.sweep.dir={a_file}/a/b"):
        with pytest.raises(ConfigError, match=f"{a_file} is a file, not a folder; choose another hydra"):
            check_output_dirs([arg])
    check_output_dirs([f"hydra.run.dir={tmp_path}/new/deeper", "hydra.run.dir=outputs/${now:%H}", "model=x"])
    if os.geteuid() != 0:  # root may write anywhere: the read-only case is checked where it can fail
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="is not writable by this user"):
            check_output_dirs([f"hydra.run.dir={tmp_path}/ro/run"])
    for script in ("train.py", "evaluate.py"):  # before Hydra, which would fail making it with a traceback
        proc = subprocess.run(
            [
                sys.executable,
                script,
                "experiment=debug" if script == "train.py" else "checkpoint=x.pth",
                f"hydra.run.dir={a_file}/run",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: hydra.run.dir={a_file}/run: {a_file} is a file, not a folder; choose another hydra.run.dir"
        ], proc.stderr


def test_a_misspelt_group_option_is_one_line_with_the_closest_names():
    with pytest.raises(ConfigError) as err:
        check_group_choices(["model=res2net50_26w_4", "data.root=/x"], CONFIGS)
    text = str(err.value)
    assert "\n" not in text and "model=res2net50_26w_4: configs/model/ has no res2net50_26w_4.yaml" in text
    assert "did you mean res2net50_26w_4s" in text
    check_group_choices(["model=res2net50_26w_4s", "experiment=debug", "data=folder", "experiment=null"], CONFIGS)


def _record(run_dir: Path, *overrides: str) -> None:
    """config.yaml as train.py writes it: resolved, what auto became on this machine."""
    cfg = OmegaConf.to_container(_compose("train", *overrides), resolve=True, enum_to_str=True)
    cfg["trainer"].update(amp="off", channels_last=False, device="cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


def test_resume_auto_takes_the_runs_recorded_config_and_the_command_line_still_wins(tmp_path):
    _record(tmp_path, "data=folder", "data.root=/data/x", "model.base_width=4", "schedule.epochs=7", "trainer.seed=3")
    now = _compose("train", "resume=auto", "trainer.max_steps=9")
    cfg = recorded_run_config(now, tmp_path, ["resume=auto", "trainer.max_steps=9"])
    assert (cfg.data.root, cfg.model.base_width, cfg.schedule.epochs, cfg.trainer.seed) == ("/data/x", 4, 7, 3)
    assert (cfg.trainer.max_steps, cfg.resume) == (9, "auto")
    assert cfg.trainer.channels_last is False  # auto | true | false: the recorded bool
    check_train_config(cfg)
    # A command naming a group (the same command again, as a SLURM requeue runs it) states the whole config itself.
    same_command = _compose("train", "resume=auto", "experiment=debug")
    assert recorded_run_config(same_command, tmp_path, ["resume=auto", "experiment=debug"]) is same_command
    later = recorded_run_config(_compose("train", "resume=auto"), tmp_path, ["resume=auto"])
    assert later.trainer.max_steps == 0  # a recorded smoke-run cap is not carried into the resume
    fresh = _compose("train")  # no resume=auto: the composed config as it is
    assert recorded_run_config(fresh, tmp_path, []) is fresh


def test_a_checkpoint_with_odd_position_values_is_one_line_naming_the_value(tmp_path):
    good = {"epoch": 1, "step_in_epoch": 2, "global_step": 10, "best_top1": 50.0, "meters": {"steps": 2.0}}
    check_checkpoint_position(good, tmp_path / "last.pth")
    for key, value in (("epoch", "x"), ("global_step", -5), ("step_in_epoch", 11), ("best_top1", math.nan)):
        with pytest.raises(CheckpointError) as err:
            check_checkpoint_position({**good, key: value}, tmp_path / "last.pth")
        assert exit_code(err.value) == 1 and "\n" not in str(err.value) and "last.pth" in str(err.value)


def test_weights_of_another_head_are_described_in_one_line():
    saved = {"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4), "conv.weight": torch.zeros(8, 3, 3, 3)}
    model = {"fc.weight": torch.zeros(5, 8), "fc.bias": torch.zeros(5), "conv.weight": torch.zeros(8, 3, 3, 3)}
    text = weights_mismatch(saved, model)
    assert "fc.weight: checkpoint [4, 8] vs model [5, 8]" in text and "\n" not in text
    assert weights_mismatch(saved, saved) == ""


def test_use_ema_on_a_run_without_ema_says_so_and_does_not_list_the_empty_key():
    ckpt = {"model": {"w": torch.zeros(1)}, "ema": None, "optimizer": {}, "epoch": 1}
    with pytest.raises(CheckpointError) as err:
        extract_state_dict(ckpt, use_ema=True, origin="checkpoint last.pth")
    assert "has no EMA weights" in str(err.value) and "'ema'" not in str(err.value)


def test_the_run_eta_counts_validation_and_does_not_jump_with_a_slow_first_window():
    eta = RunEta(epochs=2, steps_per_epoch=100, val_steps=30)
    seen = []
    for seconds in (36.0, 3.0, 18.0, 3.0, 3.0):  # 10-step windows: warm-up, then noisy steady state
        eta.add_window(seconds, 10)
        seen.append(eta.left(0, 10 * len(seen) + 10)[1])
    # A windowed rate (today's) swings 12x between the first two lines; the run's mean moves by a bounded factor.
    assert all(0.4 < later / earlier < 1.0 for earlier, later in zip(seen, seen[1:]))
    step = eta.step_seconds
    assert eta.left(0, 50)[1] == pytest.approx(50 * step + 30 * step / 3 + 100 * step + 30 * step / 3)
    eta.validated(20.0)
    assert eta.left(1, 100) == (0.0, 20.0)  # only the last validation is left


def test_the_data_set_is_named_after_its_folder_or_evaluation_set(tmp_path):
    assert dataset_name({"root": str(tmp_path / "flowers"), "backend": "torchvision"}) == "flowers"
    assert dataset_name({"root": str(tmp_path / "imagenet") + "/", "backend": "dali"}) == "imagenet"
    assert dataset_name({"root": None, "backend": "synthetic"}) == "synthetic"
    assert dataset_name({"root": "/x", "backend": "dali"}, "imagenet_r") == "imagenet_r"


@pytest.mark.slow
def test_help_and_cfg_job_do_not_import_torch():
    """Start-up time: `--help` and `--cfg job` compose configs only; torch (seconds to import) loads in the task."""
    for script, args in (("train.py", ["--help"]), ("train.py", ["--cfg", "job"]), ("evaluate.py", ["--help"])):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(REPO / script), *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "torchvision", "nvidia", "onnxruntime"))
        assert not heavy, f"{script} {' '.join(args)} imported {heavy[:5]}"


def test_a_garbage_onnx_file_and_an_image_of_another_size_are_one_line_errors(tmp_path):
    import res2net
    from res2net.export import OnnxRuntimeModel, export_onnx

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError) as err:
        OnnxRuntimeModel(garbage)
    assert str(garbage) in str(err.value) and "\n" not in str(err.value) and exit_code(err.value) == 1
    model = res2net.create_model("res2net50_26w_4s", num_classes=3, layers=[1, 1, 1, 1], base_width=4)
    net = OnnxRuntimeModel(export_onnx(model.eval(), tmp_path / "m.onnx", img_size=32), threads=1)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError) as err:
        net(torch.zeros(2, 3, 64, 64))
    assert "takes 3x32x32 (C x H x W) images, got 3x64x64" in str(err.value)
    assert exit_code(err.value) == 2 and "\n" not in str(err.value)
