"""res2net.engine.train in-process on synthetic data: each trainer knob has its effect."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import res2net
from res2net.config import register_configs
from res2net.engine.distributed import DistInfo, unwrap_model, wrap_model
from res2net.engine.train_job import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=["experiment=debug", "data.synthetic_train_size=32", "data.synthetic_val_size=16", *overrides],
        )


def _initial_weights(cfg):
    torch.manual_seed(cfg.trainer.seed)
    return res2net.create_model(
        cfg.model.name,
        num_classes=cfg.data.synthetic_num_classes,
        layers=list(cfg.model.layers),
        base_width=cfg.model.base_width,
        zero_init_last=cfg.model.zero_init_last,
    ).state_dict()


def _max_change(ckpt, initial):
    return max(
        (ckpt["model"][k].float() - v.float()).abs().max().item()
        for k, v in initial.items()
        if v.is_floating_point() and "running" not in k
    )


def _records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_debug_experiment_trains_and_writes_the_run_dir(tmp_path):
    result = train(_cfg(), tmp_path)
    assert result.status == "finished" and result.epoch == 2 and result.global_step == 8
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "best.pth").is_file()
    epochs = _records(tmp_path, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1] and all(r["rss_mb"] > 0 for r in epochs)
    assert all("val_top1_ema" not in r for r in epochs)


def test_config_yaml_is_replaced_whole_so_a_rank_reading_it_never_sees_half_a_file(tmp_path):
    # Under torchrun a late rank reads config.yaml (resume=auto) while rank 0 rewrites it: a reader that opened the
    # file before the rewrite must still read the whole previous file, as after a rename, not a truncated one.
    train(_cfg("trainer.max_steps=1"), tmp_path)
    path = tmp_path / "config.yaml"
    before = path.read_text()
    with open(path) as reader:
        train(_cfg("resume=auto", "trainer.max_steps=2"), tmp_path)
        assert reader.read() == before
    assert "max_steps: 2" in path.read_text() and "max_steps: 1" in before
    assert not list(tmp_path.glob(".config.yaml*"))  # no temporary left


def test_knobs_bf16_channels_last_ema_label_smoothing_no_decay(tmp_path):
    cfg = _cfg(
        "trainer.amp=bf16",
        "trainer.channels_last=true",
        "trainer.ema_decay=0.5",
        "loss.label_smoothing=0.1",
        "optim.no_decay_norm_bias=true",
        "schedule.warmup_epochs=1",
        "trainer.save_every_steps=3",
        "trainer.keep_last=1",
        "trainer.max_steps=6",
        "trainer.log_interval=1",
    )
    result = train(cfg, tmp_path)
    assert result.status == "max_steps" and (result.epoch, result.step_in_epoch) == (1, 2)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["model"]["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert ckpt["ema"] is not None and not torch.equal(ckpt["ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [1e-4, 0.0]
    assert ckpt["config"]["loss"]["label_smoothing"] == 0.1 and ckpt["config"]["trainer"]["amp"] == "bf16"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pth", "epoch_0001.pth", "last.pth"]
    epochs = _records(tmp_path, "epoch")
    assert {"val_top1_ema", "val_top5_ema", "val_loss_ema"} <= epochs[0].keys()
    assert epochs[-1]["partial"] is True
    lrs = [r["lr"] for r in _records(tmp_path, "train")]
    assert lrs[0] == pytest.approx(0.1 * 8 / 256 / 4)  # first of 4 warm-up steps, cosine factor 1
    assert lrs[0] < lrs[1] < lrs[2]


def test_ema_warmup_reset_copies_the_weights_through_the_warmup_then_averages(tmp_path):
    # torchvision's recipe: the EMA is the weights while the lr warms up (4 steps per epoch here, 1 warm-up epoch).
    knobs = ("trainer.ema_decay=0.5", "schedule.warmup_epochs=1", "trainer.max_steps=4")
    train(_cfg(*knobs, "trainer.ema_warmup_reset=true"), tmp_path / "reset")
    train(_cfg(*knobs), tmp_path / "plain")
    reset = torch.load(tmp_path / "reset" / "checkpoints" / "last.pth", weights_only=True)
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.pth", weights_only=True)
    assert all(torch.equal(reset["ema"][k], reset["model"][k]) for k in reset["model"])
    assert all(torch.equal(reset["model"][k], plain["model"][k]) for k in plain["model"])  # the training is the same
    assert not torch.equal(plain["ema"]["fc.weight"], plain["model"]["fc.weight"])
    # Past the warm-up it averages again; the resume (exact) recomputes the reset from the step.
    train(
        _cfg(
            "trainer.ema_decay=0.5",
            "schedule.warmup_epochs=1",
            "trainer.ema_warmup_reset=true",
            "trainer.max_steps=6",
            "resume=auto",
        ),
        tmp_path / "reset",
    )
    after = torch.load(tmp_path / "reset" / "checkpoints" / "last.pth", weights_only=True)
    assert after["global_step"] == 6 and not torch.equal(after["ema"]["fc.weight"], after["model"]["fc.weight"])
    with pytest.raises(ValueError, match="trainer.ema_warmup_reset=true resets an EMA that is off"):
        train(_cfg("trainer.ema_warmup_reset=true"), tmp_path / "off")


def test_grad_clip_bounds_the_update(tmp_path):
    cfg = _cfg("trainer.grad_clip=1e-9", "optim.weight_decay=0", "trainer.max_steps=3")
    train(cfg, tmp_path / "clipped")
    clipped = torch.load(tmp_path / "clipped" / "checkpoints" / "last.pth", weights_only=True)
    train(_cfg("optim.weight_decay=0", "trainer.max_steps=3"), tmp_path / "free")
    free = torch.load(tmp_path / "free" / "checkpoints" / "last.pth", weights_only=True)
    initial = _initial_weights(cfg)
    assert _max_change(clipped, initial) < 1e-9 < _max_change(free, initial)


def test_fp16_uses_a_grad_scaler_and_counts_skipped_steps(tmp_path):
    result = train(_cfg("trainer.amp=fp16", "trainer.max_steps=2"), tmp_path)
    assert result.status == "max_steps"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and "skipped_steps" in _records(tmp_path, "epoch")[-1]


def test_same_seed_same_weights_and_seed_matters(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(_cfg(f"trainer.seed={seed}", "trainer.deterministic=true", "trainer.max_steps=3"), tmp_path / name)
    a, b, c = (torch.load(tmp_path / n / "checkpoints" / "last.pth", weights_only=True)["model"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_resume_refuses_another_world_size_or_missing_checkpoint(tmp_path):
    train(_cfg("trainer.max_steps=1"), tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        train(_cfg("resume=nowhere.pth"), tmp_path / "x")
    ckpt = tmp_path / "checkpoints" / "last.pth"
    state = torch.load(ckpt, weights_only=True)
    state["world_size"] = 4
    torch.save(state, tmp_path / "four.pth")
    with pytest.raises(ValueError, match="written by 4 processes"):
        train(_cfg(f"resume={tmp_path / 'four.pth'}", "trainer.max_steps=2"), tmp_path / "y")


def test_num_classes_mismatch_is_named(tmp_path):
    with pytest.raises(ValueError, match="model.num_classes=7 but the training data has 10 classes"):
        train(_cfg("model.num_classes=7"), tmp_path)


def test_wrap_model_compile_keeps_plain_state_dict_keys():
    net = torch.nn.Linear(3, 2)
    wrapped = wrap_model(net, DistInfo(), compile=True)
    assert wrapped is not net and unwrap_model(wrapped) is net


def test_save_every_epochs_writes_every_nth_epoch_and_the_last(tmp_path):
    result = train(
        _cfg("schedule.epochs=3", "trainer.save_every_epochs=2", "trainer.keep_last=5", "data.synthetic_train_size=16"),
        tmp_path,
    )
    assert result.status == "finished"
    history = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*.pth"))
    assert history == ["epoch_0002.pth", "epoch_0003.pth"]  # every 2nd epoch and the last


def test_sigusr1_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    import os
    import signal
    import threading
    import time

    def send_when_training():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = tmp_path / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 1:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.002)

    previous = signal.getsignal(signal.SIGUSR1)
    sender = threading.Thread(target=send_when_training)
    sender.start()
    result = train(_cfg("data.synthetic_train_size=512", "trainer.log_interval=1", "schedule.epochs=1"), tmp_path)
    sender.join()
    assert result.status == "preempted" and 0 < result.step_in_epoch < 64
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, result.step_in_epoch, result.global_step)
    assert signal.getsignal(signal.SIGUSR1) is previous  # the handler is removed again


def test_failed_save_mid_run_stops_naming_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    import resource
    import signal
    import threading
    import time

    from res2net.engine.checkpoint import CheckpointError

    last = tmp_path / "checkpoints" / "last.pth"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_disk_after_first_checkpoint():  # a file-size limit makes the next write fail with EFBIG, like ENOSPC
        deadline = time.monotonic() + 60
        while not last.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))

    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    filler = threading.Thread(target=fill_disk_after_first_checkpoint)
    filler.start()
    try:
        with pytest.raises(CheckpointError, match=f"could not write checkpoint {last}.*previous {last} is intact"):
            train(_cfg("data.synthetic_train_size=512", "trainer.save_every_steps=2", "schedule.epochs=1"), tmp_path)
    finally:
        filler.join()
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] >= 2 and ckpt["global_step"] % 2 == 0
    assert [p.name for p in last.parent.iterdir()] == ["last.pth"]  # no temporary file left behind
