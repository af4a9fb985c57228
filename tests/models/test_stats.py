"""Parameter and MAC counts: the hook counter on hand-computed layers, then every variant against the reference."""

import pytest
import torch
import torch.nn as nn

import res2net
from res2net.models import VARIANTS
from res2net.models.stats import count_macs, count_params, main

CARD_PARAMS = {
    "res2net50_26w_4s": 25_699_120,
    "res2net50_26w_6s": 37_051_448,
    "res2net50_26w_8s": 48_403_776,
    "res2net50_48w_2s": 25_287_304,
    "res2net50_14w_8s": 25_059_816,
    "res2net101_26w_4s": 45_206_688,
}
GMACS = {
    "res2net50_26w_4s": 4.28,
    "res2net50_26w_6s": 6.33,
    "res2net50_26w_8s": 8.37,
    "res2net50_48w_2s": 4.18,
    "res2net50_14w_8s": 4.21,
    "res2net101_26w_4s": 8.10,
    "res2next50": 4.20,
    "res2net50d": 4.52,
    "res2net101d": 8.35,
}


def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return res2net.create_model(name)


def test_counter_on_tiny_layers_matches_hand_count():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8*6*6 outputs x 3*3*3 = 7776
        nn.BatchNorm2d(8),  # 2 x 288 = 576
        nn.ReLU(),  # not counted
        nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2),  # 4*3*3 outputs x (8/2)*3*3 = 1296
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # not counted
        nn.Linear(4, 5),  # 5 x 4 = 20
    )
    model.train()
    assert count_macs(model, img_size=6) == 7776 + 576 + 1296 + 20
    assert model.training  # restored
    assert count_params(model) == 3 * 8 * 9 + 16 + (8 // 2) * 4 * 9 + 4 + 4 * 5 + 5


def test_counter_same_on_cpu_and_meta():
    kwargs = dict(base_width=4, layers=[1, 1, 1, 1], num_classes=10)
    cpu = res2net.create_model("res2net50d", **kwargs)
    with torch.device("meta"):
        meta = res2net.create_model("res2net50d", **kwargs)
    assert count_macs(cpu, img_size=64) == count_macs(meta, img_size=64) > 0


@pytest.mark.parametrize("name", sorted(CARD_PARAMS))
def test_card_variants_parameter_count_exact(name):
    assert count_params(_meta_model(name)) == CARD_PARAMS[name] == VARIANTS[name].params


@pytest.mark.parametrize("name", sorted(GMACS))
def test_gmacs_round_to_published(name):
    assert round(count_macs(_meta_model(name), img_size=224) / 1e9, 2) == GMACS[name] == VARIANTS[name].gmacs


def test_stats_cli_prints_every_variant(capsys):
    main(["res2net50_26w_4s", "res2next50"])
    out = capsys.readouterr().out
    assert "| res2net50_26w_4s | 25,699,120 | 25,699,120 | 4.280 | 4.28 |" in out
    assert "| res2next50 | 24,671,464 | - | 4.200 | 4.20 |" in out
    with pytest.raises(SystemExit):
        main(["res2net51"])
