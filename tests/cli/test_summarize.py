"""scripts/summarize_runs.py on sweep directories written here the way train.py -m lays them out."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import yaml

from scripts import summarize_runs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "summarize_runs.py"


# (job dir, model override, per-epoch (val_top1, val_top5, train_loss, val_loss), world size, device, epoch time)
RUNS = [
    (
        "0",
        "res2net50_48w_2s",
        [(10.0, 30.0, 6.0, 5.5), (25.0, 50.0, 4.0, 3.5), (22.0, 52.0, 3.0, 3.6)],
        4,
        "cuda",
        1200.0,
    ),
    (
        "1",
        "res2net50_26w_4s",
        [(12.0, 33.0, 5.9, 5.2), (27.5, 55.0, 3.8, 3.2), (31.0, 58.5, 2.9, 3.0)],
        4,
        "cuda",
        1500.0,
    ),
    ("2", "res2net50_14w_8s", [(8.0, 25.0, 6.2, 5.9), (20.0, 45.0, 4.4, 4.0)], 2, "cpu", 90.0),
]


def write_run(sweep: Path, job: str, model: str, epochs, world_size: int, device: str, epoch_time: float) -> Path:
    run_dir = sweep / job
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"model={model}", "experiment=ablation_scale_equal_cost", "+trainer.max_steps=7"])
    )
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model}, "schedule": {"epochs": 3}}))
    lines = []
    for epoch, (top1, top5, train_loss, val_loss) in enumerate(epochs):
        train = {
            "kind": "train",
            "epoch": epoch,
            "step": epoch * 10 + 5,
            "loss": train_loss + 0.1,
            "lr": 0.1,
            "img_per_s": 100.0,
            "data_wait_frac": 0.01,
        }
        if device == "cuda":  # as train.py logs it
            train["gpu_mem_mb"] = 1234.0
        lines.append(train)
        lines.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": 0.1,
                "val_loss": val_loss,
                "val_top1": top1,
                "val_top5": top5,
                "epoch_time_s": epoch_time,
                "img_per_s": 100.0 * (epoch + 1),
                "global_step": (epoch + 1) * 10,
                "world_size": world_size,
                "device": device,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-26" / "14-00-00"
    for run in RUNS:
        write_run(sweep, *run)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_table_lists_knobs_best_and_final_accuracy_and_gpu_hours(sweep, tmp_path):
    summary = summarize_runs.summarize(sweep, tmp_path / "out")

    assert [run.name for run in summary.runs] == ["0", "1", "2"]
    assert "model" in summary.columns and "experiment" not in summary.columns  # only knobs that differ
    assert "experiment=ablation_scale_equal_cost" in summary.markdown and "trainer.max_steps=7" in summary.markdown

    with summary.csv_path.open() as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert rows["0"]["model"] == "res2net50_48w_2s" and rows["0"]["experiment"] == "ablation_scale_equal_cost"
    assert float(rows["0"]["best_top1"]) == 25.0 and rows["0"]["best_epoch"] == "2"
    assert float(rows["0"]["final_top1"]) == 22.0
    assert float(rows["0"]["best_top5"]) == 52.0 and float(rows["0"]["final_top5"]) == 52.0
    assert rows["0"]["epochs"] == "3/3" and rows["2"]["epochs"] == "2/3"
    assert float(rows["0"]["img_per_s"]) == 200.0  # median of the epochs' 100, 200, 300
    # 3 epochs x 1200 s on 4 GPUs = 1 h wall, 4 GPU-hours; the CPU run counts none and says so
    assert float(rows["0"]["wall_h"]) == pytest.approx(1.0) and float(rows["0"]["gpu_hours"]) == pytest.approx(4.0)
    assert float(rows["1"]["gpu_hours"]) == pytest.approx(4 * 3 * 1500 / 3600)
    assert rows["2"]["hardware"] == "CPU (2 proc)" and float(rows["2"]["gpu_hours"]) == 0.0

    table = summary.markdown_path.read_text().splitlines()
    header = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert header[:2] == ["run", "model"]
    body = [line for line in table if line.startswith("| 1 ")]
    assert len(body) == 1 and "31.00" in body[0] and "res2net50_26w_4s" in body[0] and "4 GPU" in body[0]


def test_figure_has_one_curve_per_run_with_the_logged_values(sweep, tmp_path):
    summary = summarize_runs.summarize(sweep, tmp_path)
    ax_top1, ax_loss = summary.figure.axes

    assert [text.get_text() for text in ax_top1.get_legend().get_texts()] == [
        f"{job}: model={model}" for job, model, *_ in RUNS
    ]
    for line, (_, _, epochs, *_) in zip(ax_top1.get_lines(), RUNS, strict=True):
        assert list(line.get_xdata()) == list(range(1, len(epochs) + 1))
        assert list(line.get_ydata()) == [top1 for top1, *_ in epochs]
    assert len(ax_loss.get_lines()) == 2 * len(RUNS)  # train and val loss of each run
    assert list(ax_loss.get_lines()[2].get_ydata()) == [train for _, _, train, _ in RUNS[1][2]]


def test_png_shows_every_runs_curve(sweep, tmp_path):
    summary = summarize_runs.summarize(sweep, tmp_path)
    pixels = matplotlib.image.imread(summary.png_path)[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    for index in range(len(RUNS)):
        color = np.array(matplotlib.colors.to_rgb(f"C{index}"))
        matching = np.all(np.abs(pixels - color) < 0.05, axis=-1).sum()
        assert matching > 200, f"run {index}'s colour C{index} hardly appears in {summary.png_path}: {matching} px"


def test_cli_writes_the_three_files_and_prints_the_table(sweep):
    result = subprocess.run([sys.executable, str(SCRIPT), str(sweep)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| run | model |" in result.stdout
    for name in ("summary.md", "summary.csv", "summary.png"):
        assert (sweep / name).stat().st_size > 0


def test_missing_and_empty_sweep_dirs_are_named(tmp_path, capsys):
    missing = tmp_path / "no-such-sweep"
    assert summarize_runs.main([str(missing)]) == 2
    assert f"'{missing}' does not exist" in capsys.readouterr().err

    empty = tmp_path / "empty-sweep"
    (empty / "0" / ".hydra").mkdir(parents=True)
    assert summarize_runs.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no run directories" in err and str(empty) in err


def test_malformed_metrics_line_names_file_and_line(sweep, capsys):
    metrics = sweep / "1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines.insert(2, "{not json\n")
    metrics.write_text("".join(lines))
    assert summarize_runs.main([str(sweep)]) == 2
    assert f"{metrics}:3: not a JSON object" in capsys.readouterr().err

    metrics.write_text('{"kind": "epoch", "epoch": 0}\n["no", "kind"]\n')
    assert summarize_runs.main([str(sweep)]) == 2
    assert f"{metrics}:2: expected a JSON object" in capsys.readouterr().err


def test_broken_run_config_is_named(sweep, capsys):
    config = sweep / "2" / "config.yaml"
    config.write_text("model: {name: [unclosed\n")
    assert summarize_runs.main([str(sweep)]) == 2
    assert f"{config}: not valid YAML" in capsys.readouterr().err


def test_cut_off_last_line_and_repeated_epoch_are_handled(sweep):
    metrics = sweep / "2" / "metrics.jsonl"
    # a resumed run logged epoch 1 again; the writer was then killed mid-line
    metrics.write_text(
        metrics.read_text()
        + json.dumps({"kind": "epoch", "epoch": 1, "val_top1": 21.0, "val_top5": 46.0})
        + "\n"
        + '{"kind": "epoch", "epo'
    )
    summary = summarize_runs.summarize(sweep)
    run = summary.runs[2]
    assert [record["epoch"] for record in run.epochs] == [0, 1]
    assert run.epochs[-1]["val_top1"] == 21.0


def rewrite_epoch_records(metrics: Path, change) -> None:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        if record["kind"] == "epoch":
            change(record)
    metrics.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_hardware_comes_from_the_epoch_records_not_the_checkpoints(sweep):
    (sweep / "0" / "checkpoints").mkdir()
    (sweep / "0" / "checkpoints" / "last.pth").write_bytes(b"not a checkpoint")  # never opened
    # Resumed on the CPU after two epochs on 4 GPUs: only the GPU epochs count.
    rewrite_epoch_records(sweep / "0" / "metrics.jsonl", lambda r: r.update(device="cpu") if r["epoch"] == 2 else None)
    row = summarize_runs.summarize(sweep).rows[0]
    assert row["hardware"] == "4 GPU, CPU (4 proc)"
    assert row["gpu_hours"] == pytest.approx(4 * 2 * 1200 / 3600) and row["wall_h"] == pytest.approx(1.0)


def test_bad_world_size_or_device_is_named(sweep, capsys):
    metrics = sweep / "1" / "metrics.jsonl"
    rewrite_epoch_records(metrics, lambda r: r.update(world_size="four") if r["epoch"] == 1 else None)
    assert summarize_runs.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert f"{metrics}: the \"epoch\" record of epoch 1 has world_size='four'" in err and "integer >= 1" in err

    rewrite_epoch_records(metrics, lambda r: r.update(world_size=4, device=None))
    assert summarize_runs.main([str(sweep)]) == 2
    assert f'{metrics}: the "epoch" record of epoch 0 has device=None' in capsys.readouterr().err


def test_epoch_records_without_hardware_get_no_gpu_hours(sweep):
    rewrite_epoch_records(sweep / "2" / "metrics.jsonl", lambda r: r.pop("world_size"))  # an older train.py
    row = summarize_runs.summarize(sweep).rows[2]
    assert row["hardware"] == "-" and row["gpu_hours"] is None and row["wall_h"] == pytest.approx(180 / 3600)
    assert row["notes"] == "epoch records without world_size / device (an older train.py): no GPU-hours"


def test_partial_last_epoch_is_noted(sweep):
    metrics = sweep / "1" / "metrics.jsonl"
    metrics.write_text(
        metrics.read_text()
        + json.dumps(
            {
                "kind": "epoch",
                "epoch": 3,
                "val_top1": 33.0,
                "val_top5": 60.0,
                "partial": True,
                "global_step": 35,
                "world_size": 4,
                "device": "cuda",
            }
        )
        + "\n"
    )
    row = summarize_runs.summarize(sweep).rows[1]
    assert row["final_top1"] == 33.0 and row["notes"] == "last epoch partial (stopped at global step 35)"


def test_run_without_a_finished_epoch_gets_a_row(sweep):
    (sweep / "3").mkdir()
    (sweep / "3" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 0, "step": 1, "loss": 7.0}) + "\n")
    summary = summarize_runs.summarize(sweep)
    row = summary.rows[-1]
    assert row["run"] == "3" and row["best_top1"] is None and row["notes"] == "no epoch finished"
    assert row["hardware"] == "-" and row["gpu_hours"] is None  # no epoch record yet: the hardware is unknown
    assert "| 3 |" in summary.markdown
