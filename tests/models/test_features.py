"""Feature extraction (features_only, out_indices, output_stride) against timm's features_only models."""

import pytest
import timm
import torch
from test_models import _randomize_batchnorm

import res2net

VARIANTS = res2net.list_models()
# Two blocks in the last two stages, so a dilated stage has a first block (previous dilation) and a later one.
TINY = dict(base_width=4, layers=[1, 1, 2, 2])


def _assert_equal_to_timm(name: str, output_stride: int, overrides: dict, size: int = 64) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(
        name, features_only=True, output_stride=output_stride, out_indices=(0, 1, 2, 3, 4), **overrides
    ).eval()
    _randomize_batchnorm(reference)
    ours = res2net.create_model(name, features_only=True, output_stride=output_stride, **overrides).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.feature_info.channels() == reference.feature_info.channels()
    assert ours.feature_info.reduction() == reference.feature_info.reduction()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert len(got) == 5
    for index, (g, e) in enumerate(zip(got, expected)):
        side = size // ours.feature_info.reduction(index)
        assert g.shape == e.shape == (2, ours.feature_info.channels(index), side, side)
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_equals_timm_at_output_stride_32(name):
    _assert_equal_to_timm(name, 32, {})


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", VARIANTS)
def test_dilated_reduced_variants_equal_timm(name, output_stride):
    _assert_equal_to_timm(name, output_stride, TINY)


@pytest.mark.parametrize(("name", "output_stride"), [("res2net50_26w_4s", 16), ("res2net50d", 8)])
def test_dilated_full_size_equals_timm(name, output_stride):
    _assert_equal_to_timm(name, output_stride, {})


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "res2net50d"])
def test_classifier_weights_minus_fc_load_strictly_and_give_the_same_maps(name):
    classifier = res2net.create_model(name, num_classes=10, **TINY).eval()
    _randomize_batchnorm(classifier)
    backbone = res2net.create_model(name, features_only=True, **TINY).eval()
    weights = {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
    assert list(backbone.state_dict()) == list(weights)
    backbone.load_state_dict(weights, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        torch.testing.assert_close(maps[-1], classifier.forward_features(x), rtol=0, atol=0)
    assert backbone.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert backbone.feature_info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]


def test_out_indices_subset_drops_the_unused_stages():
    backbone = res2net.create_model("res2net50_26w_4s", features_only=True, out_indices=(1, 3), **TINY).eval()
    assert not any(k.startswith("layer4.") for k in backbone.state_dict())
    assert backbone.feature_info.channels() == [256, 1024] and backbone.feature_info.reduction() == [4, 16]
    assert backbone.feature_info.channels(1) == 1024 and len(backbone.feature_info) == 2
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 16), (1, 1024, 4, 4)]


def test_dilated_classifier_folds_and_keeps_its_resolution():
    model = res2net.create_model("res2net50d", num_classes=10, output_stride=8, **TINY).eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    prepared = res2net.prepare_for_inference(model, channels_last=True)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 2048, 8, 8)
        torch.testing.assert_close(
            prepared(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(output_stride=4), "output_stride must be one of"),
        (dict(features_only=True, out_indices=(5,)), "out_indices must be"),
        (dict(features_only=True, out_indices=(3, 1)), "distinct increasing"),
        (dict(features_only=True, out_indices=()), "non-empty"),
    ],
)
def test_bad_feature_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        res2net.create_model("res2net50_26w_4s", **TINY, **kwargs)
