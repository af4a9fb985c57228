"""prepare_for_inference: BatchNorm folding keeps outputs, leaves the original alone, covers every variant."""

import pytest
import torch
import torch.nn as nn
from test_models import VARIANTS, _randomize_batchnorm

import res2net

# Reduced depth keeps every structural feature (deep stem, avg-pool shortcut, groups, splits, chained blocks).
SMALL = dict(layers=[1, 2, 1, 1], num_classes=10)


def _max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", VARIANTS)
def test_folded_model_matches_unfolded(name):
    torch.manual_seed(0)
    model = res2net.create_model(name, **SMALL)
    _randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = res2net.prepare_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    with torch.no_grad():
        expected = model(x)
        got = prepared(x.contiguous(memory_format=torch.channels_last))
    assert _max_relative_error(got, expected) < 1e-5


def test_original_is_untouched_and_copy_is_eval_channels_last():
    model = res2net.create_model("res2net50d", base_width=4, **SMALL)
    _randomize_batchnorm(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = res2net.prepare_for_inference(model, channels_last=True)
    assert model.training and not prepared.training
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert prepared.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert prepared.conv1[0].bias is not None and prepared.layer2[0].downsample[1].bias is not None
    assert isinstance(prepared.forward_features(torch.randn(1, 3, 64, 64)), torch.Tensor)


def test_channels_last_off_and_compile_on():
    model = res2net.create_model("res2net50_26w_4s", base_width=4, **SMALL)
    plain = res2net.prepare_for_inference(model, channels_last=False)
    assert plain.layer1[0].conv1.weight.is_contiguous()
    compiled = res2net.prepare_for_inference(model, channels_last=False, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)


def test_fold_refuses_batchnorm_without_conv_before_it():
    with pytest.raises(ValueError, match="without a conv directly before them: \\['2'\\]"):
        res2net.prepare_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_folded_model_matches_on_cuda():
    model = res2net.create_model("res2net50_26w_4s", **SMALL)
    _randomize_batchnorm(model)
    model = model.cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        expected = model(x)
        got = res2net.prepare_for_inference(model)(x.contiguous(memory_format=torch.channels_last))
    assert _max_relative_error(got, expected) < 1e-5
