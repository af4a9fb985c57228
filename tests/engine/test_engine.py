"""Optimizer, lr schedules, EMA, run-time checks of the training engine."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from res2net.config import OptimConfig, ScheduleConfig, TrainConfig, check_train_config
from res2net.engine.distributed import DistInfo
from res2net.engine.ema import ModelEma
from res2net.engine.optim import build_optimizer, param_groups, scaled_lr
from res2net.engine.schedule import learning_rate, set_lr
from res2net.engine.train_job import _check_machine

STEPS_PER_EPOCH = 7


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _lrs(schedule: ScheduleConfig, global_batch=256, epochs=None, optim=None):
    """lr of every step, as the optimizer sees it when the step runs (set from the global step before it)."""
    schedule = OmegaConf.structured(schedule)
    optimizer = build_optimizer(_net(), OmegaConf.structured(optim or OptimConfig()), global_batch)
    base_lr = optimizer.param_groups[0]["lr"]
    lrs = []
    for step in range((epochs or schedule.epochs) * STEPS_PER_EPOCH):
        set_lr(optimizer, learning_rate(step, STEPS_PER_EPOCH, schedule, base_lr))
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
    return lrs


def test_step_schedule_matches_the_paper_at_epoch_boundaries():
    lrs = _lrs(ScheduleConfig())
    for epoch, expected in [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (90, 0.0001), (99, 0.0001)]:
        first, last = lrs[epoch * STEPS_PER_EPOCH], lrs[(epoch + 1) * STEPS_PER_EPOCH - 1]
        assert first == pytest.approx(expected, rel=1e-12) and last == pytest.approx(expected, rel=1e-12), epoch


@pytest.mark.parametrize("global_batch, lr", [(256, 0.1), (512, 0.2), (64, 0.025), (4 * 64, 0.1), (8 * 128, 0.4)])
def test_lr_scales_linearly_with_the_global_batch(global_batch, lr):
    assert scaled_lr(0.1, global_batch) == pytest.approx(lr)
    assert _lrs(ScheduleConfig(), global_batch, epochs=1)[0] == pytest.approx(lr)
    assert _lrs(ScheduleConfig(), global_batch, epochs=31)[30 * STEPS_PER_EPOCH] == pytest.approx(lr / 10)


def test_cosine_with_warmup():
    lrs = _lrs(ScheduleConfig(name="cosine", epochs=10, warmup_epochs=2, min_lr=0.001))
    warmup = 2 * STEPS_PER_EPOCH
    assert lrs[0] == pytest.approx(0.1 / warmup)
    assert all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup]))  # rises during warm-up
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then only decays
    mid = 5 * STEPS_PER_EPOCH
    assert lrs[mid] == pytest.approx(0.001 + 0.099 * 0.5)
    assert lrs[-1] == pytest.approx(0.001, abs=2e-4)


def test_linear_is_ffcvs_triangular_schedule():
    # FFCV's get_cyclic_lr: np.interp(epoch, [0, lr_peak_epoch, epochs], [1e-4 x lr, lr, 0]) at each iteration's
    # fractional epoch (train_imagenet.py). Past the warm-up: equal; in it: the same ramp, one step ahead.
    lr, epochs, peak = 0.1, 6, 2
    lrs = _lrs(ScheduleConfig(name="linear", epochs=epochs, warmup_epochs=peak, warmup_lr=1e-4 * lr))
    steps = np.arange(epochs * STEPS_PER_EPOCH)
    ffcv = np.interp(steps / STEPS_PER_EPOCH, [0, peak, epochs], [1e-4 * lr, lr, 0])
    warmup = peak * STEPS_PER_EPOCH
    np.testing.assert_allclose(lrs[warmup:], ffcv[warmup:], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lrs[: warmup - 1], ffcv[1:warmup], rtol=1e-12)
    assert lrs[warmup - 1] == pytest.approx(lr) and lrs[-1] == pytest.approx(lr / (4 * STEPS_PER_EPOCH))
    floor = _lrs(ScheduleConfig(name="linear", epochs=4, min_lr=0.01))  # no warm-up: from lr down to min_lr
    assert floor[0] == pytest.approx(0.1) and floor[2 * STEPS_PER_EPOCH] == pytest.approx(0.055)
    assert all(a > b for a, b in zip(floor, floor[1:])) and floor[-1] > 0.01


def test_warmup_then_step():
    lrs = _lrs(ScheduleConfig(epochs=3, milestones=[2], warmup_epochs=1))
    assert lrs[0] == pytest.approx(0.1 / STEPS_PER_EPOCH)
    assert lrs[STEPS_PER_EPOCH - 1] == pytest.approx(0.1)
    assert lrs[STEPS_PER_EPOCH] == pytest.approx(0.1) and lrs[2 * STEPS_PER_EPOCH] == pytest.approx(0.01)


def test_bad_schedule_values_are_refused():
    cfg = OmegaConf.structured(TrainConfig)
    cfg.schedule.milestones = [60, 30]
    with pytest.raises(ValueError, match="milestones"):
        check_train_config(cfg)
    cfg.schedule.milestones, cfg.schedule.epochs = [30], 0
    with pytest.raises(ValueError, match="schedule.epochs=0"):
        check_train_config(cfg)


def test_sgd_settings_and_weight_decay_groups():
    net = _net()
    optimizer = build_optimizer(net, OmegaConf.structured(OptimConfig()), 256)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, False, 1e-4)
    assert len(group["params"]) == len(list(net.parameters()))  # the paper decays every parameter
    decay, no_decay = param_groups(net, 1e-4, no_decay_norm_bias=True)
    assert [p.ndim for p in decay["params"]] == [4, 2]  # conv and linear weights
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # conv bias, BN weight/bias, fc bias
    optimizer = build_optimizer(net, OmegaConf.structured(OptimConfig(no_decay_norm_bias=True, nesterov=True)), 256)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0] and optimizer.defaults["nesterov"]


def test_ema_follows_the_weights_and_copies_buffers():
    net = _net()
    ema = ModelEma(net, decay=0.75)
    before = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, before + 0.25)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 3.0))
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEma(net, decay=1.5)


def test_sync_bn_without_cuda_is_a_clear_error():
    cfg = OmegaConf.structured(TrainConfig)
    cfg.trainer.sync_bn = True
    with pytest.raises(ValueError, match="sync_bn=true needs CUDA"):
        _check_machine(cfg, DistInfo(device=torch.device("cpu")))


def test_nonsense_trainer_values_are_refused():
    cfg = OmegaConf.structured(TrainConfig)
    cfg.trainer.log_interval = 0
    with pytest.raises(ValueError, match="log_interval=0"):
        check_train_config(cfg)
    cfg.trainer.log_interval, cfg.loss.label_smoothing = 10, 1.5
    with pytest.raises(ValueError, match="loss.label_smoothing=1.5 must be in"):
        check_train_config(cfg)
    cfg.loss.label_smoothing, cfg.label_smoothing = 0.0, 0.1  # the old top-level key names its new place
    with pytest.raises(ValueError, match="moved to loss.label_smoothing; write loss.label_smoothing=0.1"):
        check_train_config(cfg)
