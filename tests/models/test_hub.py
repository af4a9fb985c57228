"""The Hugging Face hub as the third weight source, against a hub served on 127.0.0.1 (tests/hub_server.py)."""

import pytest
import torch
from hub_server import hub_server  # noqa: F401  (fixture)
from safetensors.torch import save

import res2net
from res2net.models.hub import HUB_REPOS, released_weights

TINY = dict(base_width=4, layers=[1, 1, 1, 1], scale=2)


@pytest.fixture
def env(tmp_path, monkeypatch, hub_server):  # noqa: F811
    monkeypatch.setenv("RES2NET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.base)
    # The public file locations replaced by one that has nothing, so they fail at once.
    monkeypatch.setenv("RES2NET_MIRRORS", f"{hub_server.base}/no-such-mirror")
    return hub_server


def _publish(server, name: str, num_classes: int = 1000, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    weights = res2net.create_model(name, num_classes=num_classes, **TINY).state_dict()
    server.repos[HUB_REPOS[name]] = {"model.safetensors": save(weights)}
    return weights


def _file_requests(server) -> list[str]:
    # huggingface_hub also asks the endpoint once per process for /api/agent-harnesses (its telemetry): not a file.
    return [r for r in server.requests if " /api/" not in r]


def _hub_url(name: str) -> str:
    return f"/{HUB_REPOS[name]}/resolve/main/model.safetensors"


def _assert_weights(model: torch.nn.Module, weights: dict) -> None:
    state = model.state_dict()
    assert state.keys() <= weights.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_hub_only_variant_loads_with_pretrained_true(env):
    weights = _publish(env, "res2net50d", num_classes=10)
    model = res2net.create_model("res2net50d", num_classes=10, pretrained=True, **TINY)
    _assert_weights(model, weights)
    assert _file_requests(env) == [f"HEAD {_hub_url('res2net50d')}", f"GET {_hub_url('res2net50d')}"]
    # A second load finds the file in the cache: the hub is only asked whether it changed.
    res2net.load_pretrained(model, "res2net50d")
    assert [r for r in _file_requests(env) if r.startswith("GET")] == [f"GET {_hub_url('res2net50d')}"]


def test_hub_is_tried_after_the_file_locations_fail(env):
    weights = _publish(env, "res2net50_26w_4s", num_classes=10)
    model = res2net.create_model("res2net50_26w_4s", num_classes=10, pretrained=True, **TINY)
    _assert_weights(model, weights)
    assert _file_requests(env) == [
        "GET /no-such-mirror/res2net50_26w_4s-06e79181.pth",
        f"HEAD {_hub_url('res2net50_26w_4s')}",
        f"GET {_hub_url('res2net50_26w_4s')}",
    ]


def test_pretrained_backbone_loads_the_classifier_weights(env):
    weights = _publish(env, "res2next50")
    backbone = res2net.create_model("res2next50", pretrained=True, features_only=True, out_indices=(2, 4), **TINY)
    assert not any(key.startswith("fc.") for key in backbone.state_dict())
    _assert_weights(backbone, weights)
    assert backbone.feature_info.channels() == [512, 2048]


def test_every_source_failing_names_each_one(env):
    # (An unreachable endpoint fails the same way, after huggingface_hub's own 5 retries: ~23 s.)
    with pytest.raises(
        RuntimeError,
        match="(?s)no-such-mirror/res2net50_26w_4s-06e79181.pth.*"
        "timm/res2net50_26w_4s.in1k/model.safetensors.*HF_ENDPOINT",
    ):
        released_weights("res2net50_26w_4s")
    with pytest.raises(RuntimeError, match="(?s)could not fetch the released weights of res2net101d.*404"):
        released_weights("res2net101d")
    with pytest.raises(ValueError, match="no released weights for 'resnet50'.*res2net50d"):
        released_weights("resnet50")


def test_wrong_hub_file_gives_the_key_report(env):
    _publish(env, "res2net50d", num_classes=10)
    with pytest.raises(RuntimeError, match="(?s)does not fit this Res2Net.*wrongly shaped keys.*fc.weight"):
        res2net.create_model("res2net50d", num_classes=5, pretrained=True, **TINY)
