"""Turning a source into a model's weights (res2net.models.loading.load_pretrained over the tensors-only reader of
res2net.models.pretrained): wrapper keys, DDP / compile prefixes, EMA weights, safetensors, and what a mismatch says.
Fetching the released files is tests/models/test_download.py."""

import numpy as np
import pytest
import torch

import res2net
from res2net.errors import CheckpointError, UnsafeCheckpointError
from res2net.models.loading import load_pretrained

TINY = dict(base_width=4, layers=[1, 1, 1, 1], scale=2, num_classes=10)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return res2net.create_model("res2net50_26w_4s", zero_init_last=False, **TINY)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_wrong_num_classes_names_the_classifier(tiny_model):
    model = res2net.create_model("res2net50_26w_4s", **{**TINY, "num_classes": 1000})
    with pytest.raises(
        RuntimeError,
        match=r"wrongly shaped keys \(2\): fc.weight: checkpoint \(10, 2048\) vs "
        r"model \(1000, 2048\), fc.bias",
    ):
        load_pretrained(model, tiny_model.state_dict())


def test_ddp_compiled_training_checkpoint_loads(tmp_path, tiny_model):
    weights = {f"module._orig_mod.{k}": v for k, v in tiny_model.state_dict().items()}
    checkpoint = {
        "model": weights,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "ema": None,
        "rng": {"numpy": np.random.get_state()},
        "config": {"model": {"name": "res2net50_26w_4s"}},
    }
    path = tmp_path / "last.pth"
    torch.save(checkpoint, path)  # a numpy RNG state: only the full unpickler reads it, so only when trusted
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
        load_pretrained(model, path)
    load_pretrained(model, path, trusted=True)
    assert _same_weights(model, tiny_model)


def test_ema_checkpoints_load(tmp_path, tiny_model):
    other = res2net.create_model("res2net50_26w_4s", **TINY)
    torch.save(
        {"state_dict_ema": {f"module.{k}": v for k, v in tiny_model.state_dict().items()}}, tmp_path / "ema_only.pth"
    )
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    load_pretrained(model, tmp_path / "ema_only.pth")
    assert _same_weights(model, tiny_model)
    both = {"model": other.state_dict(), "ema": tiny_model.state_dict()}
    load_pretrained(model, both)
    assert _same_weights(model, other)
    load_pretrained(model, both, use_ema=True)
    assert _same_weights(model, tiny_model)
    with pytest.raises(CheckpointError, match="has no EMA weights: its run trained without them"):
        load_pretrained(model, {"model": other.state_dict(), "ema": None}, use_ema=True)


def test_safetensors_file_loads(tmp_path, tiny_model):
    from safetensors.torch import save_file

    save_file(tiny_model.state_dict(), tmp_path / "model.safetensors")
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    load_pretrained(model, tmp_path / "model.safetensors")
    assert _same_weights(model, tiny_model)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth.*not a file.*res2net50_26w_4s"):
        load_pretrained(res2net.create_model("res2net50_26w_4s", **TINY), tmp_path / "nope.pth")
