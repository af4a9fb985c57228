"""The modern-recipe knobs of the engine: mixup / cutmix, CE / BCE, LAMB and AdamW, warm-up lr, drop path, gradient
accumulation, distillation, each against timm's reference arithmetic where timm has one, and a SIGKILL'd run with all
of them on that resumes bit-exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_engine_train import _cfg  # the debug experiment on 32 synthetic images
from timm.data.mixup import mixup_target, rand_bbox
from timm.loss import BinaryCrossEntropy as TimmBCE
from timm.loss import SoftTargetCrossEntropy as TimmSoftCE
from timm.optim import Lamb as TimmLamb
from torch import nn

import res2net
from res2net.config import OptimConfig, ScheduleConfig, TrainConfig, check_train_config, register_configs
from res2net.engine.distill import DistillationLoss, distillation_term, load_teacher
from res2net.engine.losses import (
    BinaryCrossEntropy,
    CrossEntropy,
    SoftTargetCrossEntropy,
    build_criterion,
    smooth_one_hot,
)
from res2net.engine.mixup import Mixup, _cutmix_box
from res2net.engine.optim import Lamb, build_optimizer
from res2net.engine.schedule import learning_rate
from res2net.engine.train_job import train
from res2net.engine.train_loop import backward_micro_step, optimizer_step, optimizer_steps_per_epoch
from res2net.models import Bottle2neck

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def _records(run_dir, kind):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in lines if r["kind"] == kind]


def _last(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pth", weights_only=True)


def _mixup(**overrides) -> Mixup:
    args = dict(
        alpha=0.8,
        cutmix_alpha=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        off_epoch=0,
        label_smoothing=0.1,
        num_classes=10,
        seed=3,
        rank=0,
    )
    return Mixup(**{**args, **overrides})


def _batch(n=8, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# ---- losses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sum_classes", [False, True])
@pytest.mark.parametrize("thresh", [None, 0.2])
def test_bce_matches_timm_on_labels_and_on_soft_targets(sum_classes, thresh):
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9, 3, 1, 2])
    soft = 0.7 * smooth_one_hot(labels, 10, 0.1) + 0.3 * smooth_one_hot(labels.flip(0), 10, 0.1)
    ours = BinaryCrossEntropy(smoothing=0.1, target_thresh=thresh, sum_classes=sum_classes)
    ref = TimmBCE(smoothing=0.1, target_threshold=thresh, sum_classes=sum_classes)
    for targets in (labels, soft):
        assert torch.allclose(ours(logits, targets), ref(logits, targets), rtol=1e-6, atol=0)
    summed, mean = BinaryCrossEntropy(sum_classes=True)(logits, soft), BinaryCrossEntropy()(logits, soft)
    assert torch.allclose(summed, mean * 10)  # sum over 10 classes vs mean over them


def test_criteria_of_the_loss_config():
    logits, labels = torch.randn(5, 10), torch.tensor([1, 2, 3, 4, 5])
    soft = smooth_one_hot(labels, 10, 0.2)
    loss = OmegaConf.structured(TrainConfig).loss
    loss.label_smoothing = 0.2
    plain = build_criterion(loss, soft_targets=False)
    assert isinstance(plain, nn.CrossEntropyLoss) and plain.label_smoothing == 0.2  # the paper path is unchanged
    mixed = build_criterion(loss, soft_targets=True)
    assert torch.allclose(mixed(logits, soft), TimmSoftCE()(logits, soft))
    assert torch.allclose(mixed(logits, soft), plain(logits, labels))  # smoothing folded into the targets
    loss.name = "bce"
    assert build_criterion(loss, soft_targets=False).smoothing == 0.2
    assert build_criterion(loss, soft_targets=True).smoothing == 0.0  # the mixed targets already hold it
    assert isinstance(SoftTargetCrossEntropy(), nn.Module)


def test_old_label_smoothing_key_is_refused_naming_the_new_one(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=debug", "label_smoothing=0.1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 2  # a config error (res2net.errors.USAGE_EXIT_CODE)
    assert "moved to loss.label_smoothing; write loss.label_smoothing=0.1" in proc.stdout + proc.stderr


# ---- mixup / cutmix --------------------------------------------------------------------------------------------


def test_batch_mixup_is_timms_arithmetic_with_smoothing_folded_in():
    images, labels = _batch()
    mix = _mixup(cutmix_alpha=0.0)
    lam = float(mix.draw(mix.generator(7, 0), 8, 16, 16).lam[0])
    assert 0.0 < lam < 1.0
    mixed, targets = mix(images, labels, epoch=0, step=7)
    assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(targets, mixup_target(labels, 10, lam, 0.1))
    assert torch.allclose(targets.sum(1), torch.ones(8))


def test_cutmix_box_and_corrected_lambda_are_timms():
    for seed in range(20):
        lam = np.random.default_rng(seed).beta(1.0, 1.0)
        np.random.seed(seed)
        centre = np.array([np.random.randint(0, 24), np.random.randint(0, 32)])
        np.random.seed(seed)
        yl, yh, xl, xh = rand_bbox((3, 24, 32), lam)
        box, corrected = _cutmix_box(lam, centre, 24, 32)
        assert box.tolist() == [yl, yh, xl, xh]
        assert corrected == pytest.approx(1 - (yh - yl) * (xh - xl) / (24 * 32))


def test_batch_cutmix_pastes_one_box_from_the_reversed_batch():
    images, labels = _batch()
    mix = _mixup(alpha=0.0)
    draw = mix.draw(mix.generator(2, 1), 8, 16, 16)
    (y0, y1, x0, x1), lam = draw.boxes[0], float(draw.lam[0])
    assert draw.cutmix[0] and (y1 - y0) * (x1 - x0) > 0
    mixed, targets = mix(images, labels, epoch=0, step=2, micro=1)
    expected = images.clone()
    expected[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    assert torch.equal(mixed, expected)
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
    assert torch.allclose(targets, mixup_target(labels, 10, lam, 0.1))


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_pair_and_elem_modes_mix_each_sample_with_its_mirror_by_its_own_draw(mode):
    images, labels = _batch()
    mix = _mixup(mode=mode, cutmix_alpha=0.0, label_smoothing=0.0)
    mixed, targets = mix(images, labels, epoch=0, step=5)
    lam = targets[torch.arange(8), labels]  # the weight of each sample's own label (labels distinct from mirrors)
    distinct = labels != labels.flip(0)
    lam = torch.where(distinct, lam, torch.ones(8))
    for i in torch.nonzero(distinct).flatten().tolist():
        j = 7 - i
        assert torch.allclose(mixed[i], lam[i] * images[i] + (1 - lam[i]) * images[j], atol=1e-5)
    if mode == "pair":  # a pair (i, n - 1 - i) shares one lambda: each keeps that share of its own image
        assert torch.allclose(lam[distinct], lam.flip(0)[distinct])
    assert len(set(lam[distinct].tolist())) > 1  # not one draw for the batch


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_pair_and_elem_cutmix_boxes_equal_a_per_sample_paste_in_ops_independent_of_the_batch(mode):
    from res2net.engine.census import count

    mix = _mixup(mode=mode, switch_prob=0.5, label_smoothing=0.0)

    def per_sample_reference(images, step):  # what each sample gets, written one sample at a time
        draw = mix.draw(mix.generator(step, 0), *images.shape[:1], *images.shape[2:])
        lam, cut, boxes = (mix._per_sample(draw.lam, 8), mix._per_sample(draw.cutmix, 8), draw.boxes)
        boxes = mix._per_sample_boxes(boxes, 8)
        out = images.clone()
        for i in range(8):
            if cut[i]:
                y0, y1, x0, x1 = boxes[i]
                out[i, :, y0:y1, x0:x1] = images[7 - i, :, y0:y1, x0:x1]
            else:
                out[i] = lam[i] * images[i] + (1 - lam[i]) * images[7 - i]
        return out, lam, cut

    pasted = 0
    for step in range(6):
        images, labels = _batch(seed=step)
        mixed, targets = mix(images, labels, epoch=0, step=step)
        expected, lam, cut = per_sample_reference(images, step)
        assert torch.allclose(mixed, expected, atol=1e-6), step
        assert torch.allclose(targets, _mixed_targets(labels, lam))
        pasted += int(cut.sum())
    assert 0 < pasted < 6 * 8  # both kinds drawn
    small = count(lambda: mix(*_batch(8), epoch=0, step=3))[1]
    large = count(lambda: mix(*_batch(256), epoch=0, step=3))[1]
    assert small.ops == large.ops and small.host_reads == large.host_reads == 0, (small.by_op, large.by_op)


def _mixed_targets(labels: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    one_hot = F.one_hot(labels, 10).float()
    w = torch.from_numpy(lam).float()[:, None]
    return w * one_hot + (1 - w) * one_hot.flip(0)


def test_mixup_draws_depend_only_on_the_position_and_leave_the_global_generators_alone():
    images, labels = _batch()
    mix = _mixup(mode="elem")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = mix(images, labels, epoch=0, step=11, micro=1)
    torch.rand(5), np.random.rand(5)  # other draws between two calls do not matter
    b = mix(images, labels, epoch=0, step=11, micro=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (dict(step=12, micro=1), dict(step=11, micro=0)):
        assert not torch.equal(mix(images, labels, epoch=0, **other)[0], a[0])
    other_rank = _mixup(mode="elem", rank=1)(images, labels, epoch=0, step=11, micro=1)
    assert not torch.equal(other_rank[0], a[0])
    torch.set_rng_state(torch_state), np.random.set_state(np_state)
    mix(images, labels, epoch=0, step=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and np.random.get_state()[2] == np_state[2]


def test_prob_switch_prob_and_off_epoch():
    images, labels = _batch()
    never = _mixup(prob=0.0)(images, labels, epoch=0, step=0)
    assert torch.equal(never[0], images) and torch.allclose(never[1], smooth_one_hot(labels, 10, 0.1))
    mix = _mixup(switch_prob=1.0, mode="elem")
    draws = [mix.draw(mix.generator(s, 0), 8, 16, 16) for s in range(10)]
    assert all(d.cutmix.all() for d in draws)
    mix = _mixup(switch_prob=0.0, mode="elem")
    assert not any(mix.draw(mix.generator(s, 0), 8, 16, 16).cutmix.any() for s in range(10))
    off = _mixup(off_epoch=3)
    assert not torch.equal(off(images, labels, epoch=2, step=0)[0], images)
    late = off(images, labels, epoch=3, step=0)
    assert torch.equal(late[0], images) and torch.allclose(late[1], smooth_one_hot(labels, 10, 0.1))
    lams = np.concatenate(
        [_mixup(cutmix_alpha=0.0, mode="elem").draw(np.random.default_rng(s), 8, 4, 4).lam for s in range(200)]
    )
    assert 0.45 < lams.mean() < 0.55 and lams.std() > 0.3  # Beta(0.8, 0.8): symmetric, spread out


def test_pair_mode_with_an_odd_batch_is_refused_at_start():
    cfg = OmegaConf.structured(TrainConfig)
    cfg.mixup.alpha, cfg.mixup.mode, cfg.data.batch_size = 0.2, "pair", 7
    with pytest.raises(ValueError, match="mixup.mode=pair .* data.batch_size=7 must be even"):
        check_train_config(cfg)


# ---- optimizers and schedule -----------------------------------------------------------------------------------


def _two_group_params(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    return net


@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # below and above LAMB's global grad-norm clip at 1
def test_lamb_matches_timms_lamb_on_the_same_gradients(grad_scale):
    ours_net, ref_net = _two_group_params(), _two_group_params()
    cfg = OmegaConf.structured(
        OptimConfig(
            name="lamb",
            lr=5e-3,
            base_batch=2048,
            weight_decay=0.02,
            no_decay_norm_bias=True,
            eps=1e-6,
            betas=[0.9, 0.999],
        )
    )
    ours = build_optimizer(ours_net, cfg, global_batch=2048)
    assert isinstance(ours, Lamb)
    ref = TimmLamb(
        [
            {"params": [p for p in ref_net.parameters() if p.ndim > 1], "weight_decay": 0.02},
            {"params": [p for p in ref_net.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=5e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        for a, b in zip(ours_net.parameters(), ref_net.parameters()):
            grad = torch.randn(a.shape, generator=gen) * grad_scale
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step(), ref.step()
        for lr in (5e-3 * (step + 2) / 9,):  # the schedule changes the lr between steps
            for group in (*ours.param_groups, *ref.param_groups):
                group["lr"] = lr
    for a, b in zip(ours_net.parameters(), ref_net.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    initial = _two_group_params()
    assert not torch.allclose(next(initial.parameters()), next(ours_net.parameters()))
    state = ours.state_dict()
    again = build_optimizer(_two_group_params(), cfg, global_batch=2048)
    again.load_state_dict(state)  # resumable: moments and step count in the state_dict
    assert again.param_groups[0]["step"] == 8


def test_adamw_and_sgd_from_the_config():
    net = _two_group_params()
    adamw = build_optimizer(
        net, OmegaConf.structured(OptimConfig(name="adamw", betas=[0.8, 0.9], eps=1e-7, no_decay_norm_bias=True)), 256
    )
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["eps"] == 1e-7
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0]
    sgd = build_optimizer(net, OmegaConf.structured(OptimConfig()), 512)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == pytest.approx(0.2)


def test_warmup_starts_at_warmup_lr_and_zero_keeps_the_old_ramp():
    cfg = OmegaConf.structured(ScheduleConfig(name="cosine", epochs=10, warmup_epochs=1, warmup_lr=1e-4))
    lrs = [learning_rate(s, 10, cfg, base_lr=0.1) for s in range(12)]
    assert lrs[0] == pytest.approx(1e-4 + (0.1 * _cos(0, 100) - 1e-4) / 10)
    assert lrs[9] == pytest.approx(0.1 * _cos(9, 100)) and lrs[10] == pytest.approx(0.1 * _cos(10, 100))
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    cfg.warmup_lr = 0.0
    for step in range(10):  # the former ramp, bit for bit: base_lr * (factor * (step + 1) / warmup_steps)
        assert learning_rate(step, 10, cfg, base_lr=0.1) == 0.1 * (_cos(step, 100) * ((step + 1) / 10))


def _cos(step, total):
    return 0.5 * (1 + np.cos(np.pi * step / total))


# ---- gradient accumulation --------------------------------------------------------------------------------------


def test_accumulating_2_x_8_equals_one_step_of_16_without_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14 * 14, 10))
    twin = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14 * 14, 10))
    twin.load_state_dict(net.state_dict())
    images, labels = _batch(16)
    criterion = CrossEntropy()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    whole = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    parts = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        whole.zero_grad(set_to_none=True)
        backward_micro_step(net, images, labels, scaler, criterion, amp="off")
        optimizer_step(net, whole, scaler, grad_clip=0.0)
        parts.zero_grad(set_to_none=True)
        for half in (slice(0, 8), slice(8, 16)):
            backward_micro_step(twin, images[half], labels[half], scaler, criterion, amp="off", micro_steps=2)
        optimizer_step(twin, parts, scaler, grad_clip=0.0)
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    torch.manual_seed(0)
    assert not torch.equal(net[0].weight, nn.Conv2d(3, 6, 3).weight)  # the steps moved the weights


def test_accumulation_counts_optimizer_steps_and_scales_the_lr_by_the_effective_batch(tmp_path):
    assert [optimizer_steps_per_epoch(4, a) for a in (1, 2, 3, 4, 5)] == [4, 2, 2, 1, 1]
    result = train(_cfg("trainer.accum_steps=3", "trainer.log_interval=1"), tmp_path)  # 4 batches of 8 per epoch
    assert result.status == "finished" and result.global_step == 4  # 3 + 1 batches per step, 2 epochs
    lrs = [r["lr"] for r in _records(tmp_path, "train")]
    cosine = _cfg().schedule
    assert lrs[0] == pytest.approx(0.1 * 24 / 256) and lrs[1] == pytest.approx(
        learning_rate(1, 2, cosine, 0.1 * 24 / 256)
    )
    assert [r["global_step"] for r in _records(tmp_path, "epoch")] == [2, 4]


# ---- drop path -------------------------------------------------------------------------------------------------


def test_model_drop_path_rate_reaches_the_blocks_and_only_changes_training(tmp_path):
    cfg = _cfg("model.drop_path_rate=0.3", "trainer.max_steps=1")
    model = res2net.models.model_from_config(cfg.model, num_classes=10)
    rates = [m.drop_path for m in model.modules() if isinstance(m, Bottle2neck)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain = res2net.models.model_from_config(_cfg().model, num_classes=10)
    plain.load_state_dict(model.state_dict())  # no new weights: released checkpoints still load strictly
    x = torch.randn(2, 3, 32, 32)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    train(cfg, tmp_path)
    assert _last(tmp_path)["config"]["model"]["drop_path_rate"] == 0.3


# ---- distillation ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A train.py checkpoint of a tiny Res2Net-50 variant with another width, on the debug data's 10 classes."""
    run_dir = tmp_path_factory.mktemp("teacher")
    train(_cfg("model.base_width=6", "trainer.max_steps=2"), run_dir)
    return run_dir / "checkpoints" / "last.pth"


def test_distillation_loss_is_the_kl_term_mixed_with_the_task_loss(teacher_checkpoint):
    teacher, arch = load_teacher(str(teacher_checkpoint), 10, torch.device("cpu"))
    assert arch["base_width"] == 6 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    images, labels = _batch(4, 32)
    task = CrossEntropy()
    student = torch.randn(4, 10, requires_grad=True)
    with torch.no_grad():
        t_logits = teacher(images)
    kd = DistillationLoss(task, teacher, alpha=0.25, temperature=2.0)
    expected = 0.75 * task(student, labels) + 0.25 * 4.0 * F.kl_div(
        F.log_softmax(student / 2, -1), F.softmax(t_logits / 2, -1), reduction="batchmean"
    )
    assert torch.allclose(kd(student, labels, images), expected, rtol=1e-5)
    assert torch.allclose(DistillationLoss(task, teacher, 0.0, 2.0)(student, labels, images), task(student, labels))
    assert distillation_term(t_logits, t_logits, 3.0).abs() < 1e-6  # a student equal to its teacher
    assert list(kd.state_dict()) == []  # the teacher is nobody's submodule: never saved with the run
    kd(student, labels, images).backward()
    assert student.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_teacher_errors_name_the_problem(teacher_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="predicts 10 classes, the training data has 7"):
        load_teacher(str(teacher_checkpoint), 7, torch.device("cpu"))
    weights_only = tmp_path / "weights.pth"
    torch.save(torch.load(teacher_checkpoint, weights_only=True)["model"], weights_only)
    with pytest.raises(ValueError, match="records no architecture .* pass a variant name"):
        load_teacher(str(weights_only), 10, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_teacher("nowhere.pth", 10, torch.device("cpu"))


def test_distillation_in_a_run_changes_the_trajectory_and_stays_out_of_the_checkpoint(teacher_checkpoint, tmp_path):
    common = ("trainer.max_steps=2", "trainer.deterministic=true")
    train(_cfg(*common), tmp_path / "plain")
    train(_cfg(*common, f"distill.teacher={teacher_checkpoint}", "distill.alpha=0.9"), tmp_path / "kd")
    plain, kd = _last(tmp_path / "plain"), _last(tmp_path / "kd")
    assert plain["model"].keys() == kd["model"].keys()  # no teacher weights in the checkpoint
    assert not torch.equal(plain["model"]["fc.weight"], kd["model"]["fc.weight"])
    assert kd["config"]["distill"]["teacher"] == str(teacher_checkpoint)


# ---- everything at once, killed and resumed --------------------------------------------------------------------

ALL_ON = {
    "data.synthetic_train_size": 64,
    "data.batch_size": 4,
    "mixup.alpha": 0.2,
    "mixup.cutmix_alpha": 1.0,
    "mixup.mode": "elem",
    "loss.name": "bce",
    "loss.bce_target_thresh": 0.2,
    "loss.label_smoothing": 0.1,
    "optim": "lamb",
    "optim.base_batch": 8,
    "model.drop_path_rate": 0.2,
    "trainer.accum_steps": 2,
    "trainer.deterministic": "true",
    "trainer.log_interval": 1,
    "trainer.save_every_steps": 2,
    "distill.alpha": 0.5,
    "distill.temperature": 2.0,
}  # 16 batches of 4 per epoch = 8 optimizer steps, 2 epochs


def _command(run_dir: Path, teacher: Path, **extra) -> list[str]:
    settings = {**ALL_ON, "distill.teacher": str(teacher), **extra}
    return [sys.executable, str(REPO / "train.py"), "experiment=debug", f"hydra.run.dir={run_dir}"] + [
        f"{key}={value}" for key, value in settings.items()
    ]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONPATH=str(REPO))


def _run(run_dir: Path, teacher: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(run_dir, teacher, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        timeout=300,
    )


def test_kill_9_with_every_recipe_knob_on_then_resume_is_bit_exact(tmp_path, teacher_checkpoint):
    reference = _run(tmp_path / "reference", teacher_checkpoint)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert "distilling from" in reference.stdout and "x 2 accumulated = 8" in reference.stdout
    step = random.randint(3, 14)  # from step 3 on, the save at step 2 has finished
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(run_dir, teacher_checkpoint), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )
    deadline = time.monotonic() + 240
    while not any(r["step"] >= step for r in _records(run_dir, "train")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _last(run_dir)["global_step"] < 16, f"kill came too late (step {step})"
    resumed = _run(run_dir, teacher_checkpoint, resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _last(tmp_path / "reference"), _last(run_dir)
    assert a["global_step"] == b["global_step"] == 16
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and sa.keys() == sb.keys() == {"exp_avg", "exp_avg_sq"}
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [g["step"] for g in a["optimizer"]["param_groups"]] == [16, 16]
    assert [r["step"] for r in _records(run_dir, "train")] == list(range(1, 17))
    assert [r["loss"] for r in _records(run_dir, "train")] == [
        r["loss"] for r in _records(tmp_path / "reference", "train")
    ]


# ---- presets ---------------------------------------------------------------------------------------------------

PRESETS = ("rsb_a1", "rsb_a2", "rsb_a3", "tv_recipe", "fast")
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_model_and_states_its_source(preset):
    header = (CONFIGS / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0]
    assert all(word in header for word in ("Published:", "Adapted:", "ResNet-50")), preset
    for model in MODELS:
        cfg = _compose(f"experiment={preset}", f"model={model}")
        assert OmegaConf.get_type(cfg) is TrainConfig and cfg.model.name == model
        check_train_config(cfg)
        global_batch = cfg.data.batch_size * 4 * cfg.trainer.accum_steps  # on the 4-GPU box the presets name
        assert global_batch == {"fast": 1024, "tv_recipe": 1024}.get(preset, 2048)


def test_cfg_job_of_rsb_a3_shows_the_procedure(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg", "job", "experiment=rsb_a3", "model=res2net50_14w_8s"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import yaml

    job = yaml.safe_load(proc.stdout)
    assert job["model"]["name"] == "res2net50_14w_8s"
    assert (job["optim"]["name"], job["optim"]["lr"], job["optim"]["base_batch"]) == ("lamb", 8e-3, 2048)
    assert (job["loss"]["name"], job["loss"]["label_smoothing"]) == ("bce", 0.0)
    assert (job["mixup"]["alpha"], job["mixup"]["cutmix_alpha"]) == (0.1, 1.0)
    assert job["data"]["auto_augment"] == "rand-m6-mstd0.5-inc1"
    assert (job["schedule"]["name"], job["schedule"]["epochs"], job["schedule"]["warmup_epochs"]) == ("cosine", 100, 5)
    assert (job["data"]["img_size"], job["data"]["val_img_size"], job["data"]["crop_pct"]) == (160, 224, 0.95)
