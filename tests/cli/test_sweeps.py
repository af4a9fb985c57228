"""Ablation presets (configs/experiment/ablation_*.yaml, short_schedule.yaml) and a real `python train.py -m` sweep."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_summarize import summarize_runs

import res2net
from res2net.config import register_configs
from res2net.models.stats import count_macs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SUMMARIZE = REPO / "scripts" / "summarize_runs.py"

# preset -> (swept key, the values it sweeps)
ABLATIONS = {
    "ablation_scale_equal_cost": ("model", ["res2net50_48w_2s", "res2net50_26w_4s", "res2net50_14w_8s"]),
    "ablation_scale_fixed_width": ("model", ["res2net50_26w_4s", "res2net50_26w_6s", "res2net50_26w_8s"]),
    "ablation_depth": ("model", ["res2net50_26w_4s", "res2net101_26w_4s"]),
    "ablation_label_smoothing": ("loss.label_smoothing", ["0.0", "0.1"]),
}
TINY = [
    "data=folder",
    "data.img_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "model.layers=[1,1,1,1]",
    "model.base_width=4",
    "schedule.epochs=2",
    "trainer.log_interval=2",
]


def compose_train(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sweep_params(preset: str) -> dict[str, list[str]]:
    params = compose_train([f"experiment={preset}"]).hydra.sweeper.params
    return {key: [value.strip() for value in str(values).split(",")] for key, values in params.items()}


@pytest.mark.parametrize("preset", sorted(ABLATIONS))
def test_ablation_preset_sweeps_the_intended_values(preset):
    key, values = ABLATIONS[preset]
    assert sweep_params(preset) == {key: values}
    for value in values:  # every job of the sweep composes against the typed schema
        cfg = compose_train([f"experiment={preset}", f"{key}={value}"])
        assert str(cfg.model.name if key == "model" else OmegaConf.select(cfg, key)) == value
        assert cfg.hydra.sweep.dir.startswith(f"multirun/{preset}/")
        assert cfg.schedule.name.value == "step" and cfg.schedule.epochs == 100  # the paper's recipe otherwise


def model_macs(name: str) -> int:
    model_cfg = compose_train([f"model={name}"]).model
    model = res2net.models.model_from_config(model_cfg)
    return count_macs(model, img_size=112)


def test_equal_cost_scales_cost_about_the_same_and_fixed_width_grows():
    equal = [model_macs(name) for name in ABLATIONS["ablation_scale_equal_cost"][1]]
    assert max(equal) / min(equal) < 1.05, equal
    fixed = [model_macs(name) for name in ABLATIONS["ablation_scale_fixed_width"][1]]
    assert fixed[0] < fixed[1] < fixed[2] and fixed[2] / fixed[0] > 1.8, fixed


def test_short_schedule_alone_and_after_an_ablation():
    cfg = compose_train(["experiment=short_schedule"])
    assert (cfg.schedule.name.value, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == ("cosine", 20, 1.0)
    combined = compose_train(["experiment=[ablation_depth,short_schedule]"])
    assert combined.schedule.epochs == 20 and combined.schedule.name.value == "cosine"
    assert str(combined.hydra.sweeper.params.model) == ",".join(ABLATIONS["ablation_depth"][1])


# basic: jobs one after the other in this process; submitit_local: each job in its own process through the submitit
# plugin, the code path of hydra/launcher=slurm short of the cluster.
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_of_two_tiny_jobs_then_summary(image_folder, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            f"hydra/launcher={launcher}",
            "experiment=ablation_label_smoothing",
            *TINY,
            f"data.root={image_folder}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_dirs = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [path.name for path in run_dirs] == ["0", "1"]
    for run_dir, smoothing in zip(run_dirs, (0.0, 0.1)):
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["label_smoothing"] == smoothing
        assert f"loss.label_smoothing={smoothing}" in yaml.safe_load(
            (run_dir / ".hydra" / "overrides.yaml").read_text()
        )
        assert (run_dir / "checkpoints" / "last.pth").is_file()

    summary = subprocess.run(
        [sys.executable, str(SUMMARIZE), str(sweep)], env=env, capture_output=True, text=True, timeout=120
    )
    assert summary.returncode == 0, summary.stderr
    table = [line for line in summary.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | loss.label_smoothing | epochs | best_top1 |")
    assert [row.split("|")[1:3] for row in table[1:]] == [[" 0 ", " 0.0 "], [" 1 ", " 0.1 "]]
    assert all(" 2/2 " in row and "CPU (1 proc)" in row for row in table[1:])

    figure = summarize_runs.summarize(sweep, tmp_path / "again").figure
    ax_top1, ax_loss = figure.axes
    assert [t.get_text() for t in ax_top1.get_legend().get_texts()] == [
        "0: loss.label_smoothing=0.0",
        "1: loss.label_smoothing=0.1",
    ]
    assert all(len(line.get_xdata()) == 2 for line in ax_top1.get_lines() + ax_loss.get_lines())
    assert (sweep / "summary.png").stat().st_size > 10_000
