"""The network: layout and outputs against timm's reference implementation, overrides, validation, init."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import res2net
from res2net.models import CONFIG_KEYS, MODEL_KNOBS, Bottle2neck, Res2Net, model_from_config, resolve_model_config
from res2net.models import VARIANTS as VARIANT_TABLE
from res2net.models.registry import INIT_KEYS

VARIANTS = [
    "res2net101_26w_4s",
    "res2net101d",
    "res2net50_14w_8s",
    "res2net50_26w_4s",
    "res2net50_26w_6s",
    "res2net50_26w_8s",
    "res2net50_48w_2s",
    "res2net50d",
    "res2next50",
]
TINY = dict(base_width=4, layers=[1, 2, 1, 1], num_classes=10)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    # Random BN statistics and affine parameters, so zero-initialised bn3 weights cannot hide a wrong block.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def test_list_models_is_sorted_and_complete():
    assert res2net.list_models() == VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_layout_equals_timm(name):
    with torch.device("meta"):
        ours, reference = res2net.create_model(name), timm.create_model(name)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert list(ours_shapes) == list(reference_shapes)
    assert ours_shapes == reference_shapes


@pytest.mark.parametrize("name", VARIANTS)
def test_outputs_equal_timm_with_shared_weights(name):
    torch.manual_seed(0)
    reference = timm.create_model(name)
    _randomize_batchnorm(reference)
    ours = res2net.create_model(name)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ours.eval()(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes(name):
    model = res2net.create_model(name, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2048, 2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, 2048)
        assert model.forward_head(features).shape == (2, 10)
        assert model(x).shape == (2, 10)
    assert model.num_classes == 10 and model.fc.out_features == 10


def _conv3_input(block: Bottle2neck, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = block.conv3.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    block(x)
    handle.remove()
    return captured[0]


def test_block_split_wiring_by_hand():
    # With identity 3x3 convs (BNs at their initial statistics), the input of conv3 shows how splits are wired.
    torch.manual_seed(0)
    first = Bottle2neck(16, 4, stride=1, downsample=nn.Conv2d(16, 16, 1), base_width=64, scale=4).eval()
    plain = Bottle2neck(16, 4, base_width=64, scale=4).eval()
    assert first.is_first and first.pool.count_include_pad and plain.pool is None
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        for block in (first, plain):
            for conv in block.convs:
                conv.weight.zero_()
                conv.weight[:, :, 1, 1] = torch.eye(4)
        s = torch.relu(first.bn1(first.conv1(x))).split(4, dim=1)
        # First block: splits convolved on their own, the last one average-pooled (3x3, zeros count at borders).
        pooled = nn.functional.avg_pool2d(s[3], 3, stride=1, padding=1, count_include_pad=True)
        assert pooled[0, 0, 0, 0] == pytest.approx(s[3][0, 0, :2, :2].sum().item() / 9, rel=1e-5)
        torch.testing.assert_close(
            _conv3_input(first, x), torch.cat([s[0], s[1], s[2], pooled], 1), rtol=1e-4, atol=1e-4
        )
        # Other blocks: split i gets the previous split's output added, the last split passes through.
        s = torch.relu(plain.bn1(plain.conv1(x))).split(4, dim=1)
        expected = [s[0], s[0] + s[1], s[0] + s[1] + s[2], s[3]]
        torch.testing.assert_close(_conv3_input(plain, x), torch.cat(expected, 1), rtol=1e-4, atol=1e-4)


def test_d_variant_stem_and_downsample_layout():
    model = res2net.create_model("res2net50d", **TINY)
    assert [k for k in model.state_dict() if k.startswith("conv1.")] == [
        "conv1.0.weight",
        "conv1.1.weight",
        "conv1.1.bias",
        "conv1.1.running_mean",
        "conv1.1.running_var",
        "conv1.1.num_batches_tracked",
        "conv1.3.weight",
        "conv1.4.weight",
        "conv1.4.bias",
        "conv1.4.running_mean",
        "conv1.4.running_var",
        "conv1.4.num_batches_tracked",
        "conv1.6.weight",
    ]
    assert [m.out_channels for m in model.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert isinstance(model.layer1[0].downsample[0], nn.Identity)
    pool = model.layer2[0].downsample[0]
    assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and not pool.count_include_pad
    assert model.layer2[0].downsample[1].stride == (1, 1)


@pytest.mark.parametrize("scale", [1, 2, 5])
def test_scale_override_sets_number_of_splits(scale):
    model = res2net.create_model("res2net50_26w_4s", scale=scale, **TINY)
    block = model.layer2[1]
    assert len(block.convs) == max(1, scale - 1) and block.scale == scale
    assert block.conv1.out_channels == block.width * scale
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_overrides_take_effect():
    model = res2net.create_model(
        "res2net50_26w_4s",
        base_width=8,
        cardinality=2,
        layers=[1, 2, 3, 1],
        in_chans=1,
        num_classes=7,
        stem="deep",
        avg_down=True,
    )
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 2, 3, 1]
    assert model.layer1[0].width == 8 * 2 and model.layer4[0].width == 64 * 2
    assert model.layer1[0].convs[0].groups == 2
    assert model.conv1[0].in_channels == 1 and model.fc.out_features == 7
    assert isinstance(model.layer3[0].downsample[0], nn.AvgPool2d)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_none_override_keeps_variant_value_and_omegaconf_list_is_accepted():
    model = res2net.create_model("res2net50_26w_6s", scale=None, base_width=4, layers=OmegaConf.create([1, 1, 1, 1]))
    assert model.layer1[0].scale == 6 and len(model.layer3) == 1


def test_num_classes_zero_returns_pooled_features():
    model = res2net.create_model("res2net50_26w_4s", base_width=4, layers=[1, 1, 1, 1], num_classes=0).eval()
    assert isinstance(model.fc, nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_drop_rate_is_dropout_before_fc():
    model = res2net.create_model("res2net50_26w_4s", drop_rate=0.5, **TINY)
    features = torch.randn(4, 2048, 2, 2)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.forward_head(features, pre_logits=True), features.mean((2, 3)))
        model.eval()
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean((2, 3)))


def test_init_kaiming_fan_out_and_zero_init_last_knob():
    torch.manual_seed(0)
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    conv = model.layer4[0].conv3  # 1x1, fan_out = 2048
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.05)
    # The authors' init (the table's zero_init_last=False): every BN starts at weight 1, bias 0.
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    zeroed = res2net.create_model("res2net50_26w_4s", zero_init_last=True, **TINY)
    assert all(
        torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight))
        for b in zeroed.modules()
        if isinstance(b, Bottle2neck)
    )
    assert torch.equal(zeroed.layer1[0].bn1.weight, torch.ones(zeroed.layer1[0].bn1.num_features))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", VARIANTS)
def test_model_config_builds_exactly_what_create_model_builds(name):
    # What train.py model=<name> composes: the group file, or a ModelConfig with every knob left at None.
    tiny = {"layers": [1, 1, 1, 1]}  # the variant's depth only slows the test down; every other knob is its own
    composed = OmegaConf.merge(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"), tiny)
    unset = {**dict.fromkeys(CONFIG_KEYS), "name": name, **tiny}
    torch.manual_seed(0)
    by_name = res2net.create_model(name, **tiny)
    for cfg in (composed, unset):
        torch.manual_seed(0)
        assert _same_state(model_from_config(cfg), by_name)


def test_config_keys_are_the_model_config_fields():
    from res2net.config import ModelConfig

    assert [f.name for f in dataclasses.fields(ModelConfig)] == [*CONFIG_KEYS, *INIT_KEYS]
    assert CONFIG_KEYS == ("name", "num_classes", *MODEL_KNOBS)  # the architecture; INIT_KEYS: where weights start


def test_resolve_model_config_fills_the_variant_values():
    cfg = OmegaConf.create({**dict.fromkeys(CONFIG_KEYS), "name": "res2next50", "scale": 6, "layers": [1, 2, 1, 1]})
    resolved = resolve_model_config(cfg)
    assert resolved == {
        "name": "res2next50",
        "num_classes": None,
        "layers": [1, 2, 1, 1],
        "base_width": 4,
        "scale": 6,
        "cardinality": 8,
        "stem": "",
        "avg_down": False,
        "zero_init_last": False,
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
    }
    assert type(resolved["layers"]) is list  # plain values: config.yaml records them as written
    # The resolved config rebuilds the same network.
    torch.manual_seed(0)
    first = model_from_config(cfg, num_classes=10)
    torch.manual_seed(0)
    assert _same_state(model_from_config({**resolved, "num_classes": 10}), first)
    assert resolve_model_config({"name": "res2net50d"})["layers"] == [3, 4, 6, 3]


def test_model_from_config_num_classes():
    tiny = {"name": "res2net50_26w_4s", "base_width": 4, "layers": [1, 1, 1, 1]}
    assert model_from_config(tiny).num_classes == 1000
    assert model_from_config(tiny, num_classes=7).num_classes == 7
    assert model_from_config({**tiny, "num_classes": 7}, num_classes=7).num_classes == 7
    with pytest.raises(ValueError, match="model.num_classes=5 but the caller needs num_classes=7"):
        model_from_config({**tiny, "num_classes": 5}, num_classes=7)


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (
            {"name": "res2net50_26w_4s", "drop_block_rate": 0.1},
            "unknown model config key(s) ['drop_block_rate']; valid keys: name, num_classes, layers, base_width",
        ),
        ({"name": "res2net51"}, "unknown model 'res2net51'; valid names: res2net101_26w_4s"),
        ({"scale": 4}, "unknown model None; valid names"),
        ({"name": "res2net50_26w_4s", "stem": "deeep"}, "stem must be one of ('', 'deep'), got 'deeep'"),
        ({"name": "res2net50_26w_4s", "layers": [3, 4, 6]}, "layers must be a list of 4 integers"),
        (["res2net50_26w_4s"], "a model config must be a mapping with keys name, num_classes"),
    ],
)
def test_bad_model_config_names_the_key_and_choices(cfg, fragment):
    with pytest.raises(ValueError) as info:
        model_from_config(cfg)
    assert fragment in str(info.value)


def test_variant_table_is_complete():
    assert sorted(VARIANT_TABLE) == VARIANTS
    for name, variant in VARIANT_TABLE.items():
        assert variant.name == name and variant.hub_id == f"timm/{name}.in1k"
        assert list(variant.arch()) == list(MODEL_KNOBS) and variant.gmacs is not None and variant.top1 is not None
        assert (variant.file is None) == (variant.urls == ())


@pytest.mark.parametrize(
    "override, fragment",
    [
        (dict(scale=0), "scale"),
        (dict(scale=1.5), "scale"),
        (dict(base_width=0), "base_width"),
        (dict(cardinality=0), "cardinality"),
        (dict(layers=[3, 4, 6]), "layers"),
        (dict(layers=[3, 0, 6, 3]), "layers[1]"),
        (dict(layers="3463"), "layers"),
        (dict(stem="deeep"), "('', 'deep')"),
        (dict(avg_down="yes"), "avg_down"),
        (dict(zero_init_last=1), "zero_init_last"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(in_chans=0), "in_chans"),
        (dict(num_classes=-1), "num_classes"),
        (dict(scale=True), "scale"),
    ],
)
def test_bad_override_values_raise_value_error(override, fragment):
    with pytest.raises(ValueError, match=None) as info:
        res2net.create_model("res2net50_26w_4s", **override)
    assert fragment in str(info.value)


def test_drop_path_rates_grow_linearly_over_the_blocks_as_in_timm():
    model = res2net.create_model("res2net50_26w_4s", drop_path_rate=0.2, **TINY)
    rates = [m.drop_path for m in model.modules() if isinstance(m, Bottle2neck)]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    reference = timm.create_model("resnet50", drop_path_rate=0.2, layers=[1, 2, 1, 1])
    timm_rates = [
        0.0 if b.drop_path is None else b.drop_path.drop_prob
        for s in range(1, 5)
        for b in getattr(reference, f"layer{s}")
    ]
    assert rates == pytest.approx(timm_rates)


def test_drop_path_drops_or_rescales_each_sample_in_training_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    block = Bottle2neck(64, 16, base_width=8, scale=4, drop_path=0.5)
    plain = Bottle2neck(64, 16, base_width=8, scale=4)
    _randomize_batchnorm(block)
    plain.load_state_dict(block.state_dict())
    x = torch.randn(64, 64, 6, 6)
    branches = []
    block.bn3.register_forward_hook(lambda module, inputs, output: branches.append(output))
    block.train()
    out = block(x)
    branch = branches[-1]
    kept = torch.relu(branch / 0.5 + x)
    dropped = torch.relu(x)
    is_kept = [torch.allclose(o, k, atol=1e-5) for o, k in zip(out, kept)]
    is_dropped = [torch.allclose(o, d, atol=1e-6) for o, d in zip(out, dropped)]
    assert all(k != d for k, d in zip(is_kept, is_dropped))  # each sample one or the other, never a mix
    assert 16 < sum(is_dropped) < 48  # about half of 64 at rate 0.5
    plain.load_state_dict(block.state_dict())  # the running statistics of that training forward
    block.eval(), plain.eval()
    assert torch.equal(block(x), plain(x))


def test_unknown_name_and_unknown_override_name_valid_choices():
    with pytest.raises(ValueError, match="res2net50_26w_4s.*res2next50"):
        res2net.create_model("res2net51")
    with pytest.raises(ValueError, match="drop_block_rate.*valid overrides: layers, base_width, scale"):
        res2net.create_model("res2net50_26w_4s", drop_block_rate=0.1)


def test_direct_construction_is_typed():
    with pytest.raises(TypeError):
        Res2Net(layers=[1, 1, 1, 1], drop_block_rate=0.1)


def test_models_package_imports_with_torch_alone():
    code = (
        "import sys\n"
        'for name in ("hydra", "omegaconf", "nvidia", "nvidia.dali", "timm", "torchvision", "tensorboard"):\n'
        "    sys.modules[name] = None\n"
        "import res2net.models, res2net\n"
        'print(res2net.create_model("res2next50", base_width=4, layers=[1, 1, 1, 1]).num_classes)\n'
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1000"
