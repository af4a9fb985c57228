"""The CUDA-only training paths on one GPU: a DDP step over NCCL (a world-size-1 process group), SyncBatchNorm, bf16 and
fp16 steps (fp16's skipped-step flag), channels_last, torch.compile, and no host synchronisation in the steady-state
step (backward_micro_step + optimizer_step + StepAgreement, as train_one_epoch runs them). Skipped without a
GPU; scripts/gpu_check.sh runs them.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

import res2net
from res2net.config import OptimConfig
from res2net.engine.distributed import unwrap_model
from res2net.engine.ema import ModelEma
from res2net.engine.losses import CrossEntropy
from res2net.engine.optim import build_optimizer
from res2net.engine.schedule import set_lr
from res2net.engine.train_loop import StepAgreement, _scale_before, backward_micro_step, optimizer_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TINY = dict(num_classes=10, base_width=8, scale=2, layers=[1, 1, 1, 1])
CUDA = torch.device("cuda", 0)


def _step(model, x, y, optimizer, scaler, criterion, amp):
    """One optimizer step on one batch, as train_one_epoch runs it; the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward_micro_step(model, x, y, scaler, criterion, amp=amp)
    optimizer_step(model, optimizer, scaler, grad_clip=0.0)
    return loss


def tiny_model(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = res2net.create_model("res2net50_26w_4s", **TINY).to(CUDA)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(n: int = 8, size: int = 64, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(n, 3, size, size, device=CUDA, generator=g)
    y = torch.randint(0, 10, (n,), device=CUDA, generator=g)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def one_step(model: nn.Module, amp: str = "off", scaler=None, channels_last: bool = False) -> torch.Tensor:
    optimizer = build_optimizer(unwrap_model(model), OptimConfig(), global_batch=8)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    x, y = batch(channels_last=channels_last)
    return _step(model, x, y, optimizer, scaler, CrossEntropy(), amp)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unwrap_model(model).parameters()]


def changed(before: list[torch.Tensor], model: nn.Module) -> bool:
    return all(not torch.equal(a, p) for a, p in zip(before, unwrap_model(model).parameters()) if p.dim() > 1)


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    """A one-process NCCL group, as train.py's is on each GPU of a torchrun job."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=CUDA)
    yield
    dist.destroy_process_group()


def test_sync_batchnorm_kernels_match_batchnorm(nccl_group):
    """SyncBatchNorm's statistics exchange (all_gather / all_reduce over NCCL and its CUDA kernels), called directly:
    the module itself takes the plain BatchNorm path in a one-process group."""
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(8, 16, 10, 10, device=CUDA, generator=g)
    weight, bias = torch.rand(16, device=CUDA, generator=g) + 0.5, torch.randn(16, device=CUDA, generator=g)
    grad = torch.randn(x.shape, device=CUDA, generator=g)
    results = []
    for sync in (True, False):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        running = [torch.zeros(16, device=CUDA), torch.ones(16, device=CUDA)]
        if sync:
            out = SyncBatchNormFunction.apply(*inputs, *running, 1e-5, 0.1, dist.group.WORLD, 1)
        else:
            out = F.batch_norm(inputs[0], *running, inputs[1], inputs[2], training=True, momentum=0.1, eps=1e-5)
        out.backward(grad)
        results.append([out, *running, *(t.grad for t in inputs)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sync_bn", [False, True], ids=["ddp", "ddp_sync_bn"])
def test_ddp_step_over_nccl(nccl_group, sync_bn):
    model = tiny_model()
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
    before = weights(ddp)
    loss = one_step(ddp)
    assert dist.get_backend() == "nccl" and torch.isfinite(loss)
    assert changed(before, ddp)
    # The agreement's asynchronous all-reduce over NCCL, posted and read a step later. world_size=2 makes it take
    # the reduce path in this one-process group, where the sum is this rank's value alone: the "mean" is half.
    agreement = StepAgreement(CUDA, 2, torch.amp.GradScaler("cuda", enabled=False))
    agreement.post(loss, False, None)
    agreement.post(loss, True, None)
    mean, stop, skipped = agreement.collect()
    assert mean == pytest.approx(loss.item() / 2) and not stop and not skipped
    assert agreement.collect()[1]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step(amp):
    model = tiny_model()
    before = weights(model)
    # fp16: a low initial loss scale, so that this first step does not overflow (the next test covers that case)
    loss = one_step(model, amp, torch.amp.GradScaler("cuda", init_scale=256.0, enabled=amp == "fp16"))
    assert torch.isfinite(loss) and changed(before, model)


def test_fp16_overflowed_step_is_skipped_and_counted_on_the_device():
    for init_scale, expect_skip in ((2.0**40, True), (1.0, False)):
        model = tiny_model()
        scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
        agreement = StepAgreement(CUDA, 1, scaler)
        before = weights(model)
        scale_before = _scale_before(scaler, CUDA)
        loss = one_step(model, "fp16", scaler)
        agreement.post(loss, False, scale_before)
        _, _, skipped = agreement.collect()
        assert skipped is expect_skip
        assert changed(before, model) is not expect_skip  # a skipped step leaves the weights alone


def test_channels_last_bf16_step_keeps_the_layout():
    model = tiny_model(channels_last=True)
    before = weights(model)
    loss = one_step(model, "bf16", channels_last=True)
    assert torch.isfinite(loss) and changed(before, model)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_step_matches_eager():
    eager, compiled = tiny_model(), torch.compile(tiny_model())
    for _ in range(2):
        loss_eager, loss_compiled = one_step(eager), one_step(compiled)
    assert torch.allclose(loss_eager, loss_compiled, rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.parameters(), unwrap_model(compiled).parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_steady_state_step_never_waits_for_the_device(amp):
    """train_one_epoch's per-step work (lr, step, EMA, agreement posted and the previous one read) under
    set_sync_debug_mode('error'): any host synchronisation (.item(), a blocking copy, stream sync) raises. The
    agreement's read waits on an event of the step before, which the mode does not count (nor should: it is
    finished)."""
    channels_last = amp == "bf16"
    model = tiny_model(channels_last)
    optimizer = build_optimizer(model, OptimConfig(), global_batch=8)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ema = ModelEma(model, 0.99)
    criterion = CrossEntropy(label_smoothing=0.1)
    agreement = StepAgreement(CUDA, 1, scaler)
    x, y = batch(channels_last=channels_last)
    results = []

    def step(i: int) -> None:
        set_lr(optimizer, 0.1 / (i + 1))
        loss = _step(model, x, y, optimizer, scaler, criterion, amp)
        ema.update(model)
        agreement.post(loss, False, _scale_before(scaler, CUDA))
        if len(agreement.pending) > 1:
            results.append(agreement.collect())

    for i in range(3):  # warm-up: cuDNN autotuning, allocator pools, pinned buffers
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3, 8):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(results) == 7 and all(torch.isfinite(torch.tensor(r[0])) and not r[1] and not r[2] for r in results)
