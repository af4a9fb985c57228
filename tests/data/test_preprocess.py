"""res2net.data.preprocess: a checkpoint's own evaluation preprocessing, and command-line values winning."""

import pytest

from res2net.data.preprocess import (
    PUBLISHED,
    Preprocessing,
    command_line_fields,
    preprocessing_of,
    published_preprocessing,
)


def _train_checkpoint(**data):
    base = dict(img_size=64, val_img_size=None, crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3)
    return {"model": {}, "config": {"model": {"name": "res2net50_26w_4s"}, "data": {**base, **data}}}


def test_train_checkpoint_gives_its_stored_data_config():
    pp = preprocessing_of(_train_checkpoint())
    assert pp == Preprocessing(64, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert pp.resize_size == 64
    assert preprocessing_of(_train_checkpoint(val_img_size=80)).img_size == 80  # val_img_size wins over img_size


def test_released_weights_get_the_published_values():
    assert preprocessing_of({"conv1.weight": None}, "res2net50_26w_4s") == PUBLISHED
    assert (PUBLISHED.img_size, PUBLISHED.crop_pct, PUBLISHED.interpolation, PUBLISHED.resize_size) == (
        224,
        0.875,
        "bilinear",
        256,
    )
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        published_preprocessing("resnet50")


def test_records_round_trip():
    pp = Preprocessing(96, 0.9, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert preprocessing_of({"preprocessing": pp.to_dict()}) == pp
    assert preprocessing_of({"pretrained_cfg": pp.pretrained_cfg()}) == pp
    assert {**{"img_size": 1}, **pp.data_overrides()}["val_img_size"] == 96


def test_command_line_wins():
    fields = command_line_fields(["data=folder", "data.root=x", "data.val_img_size=48", "++data.crop_pct=0.5", "a=1"])
    assert fields == {"img_size", "crop_pct"}
    pp = preprocessing_of(_train_checkpoint())
    data_cfg = {"img_size": 224, "val_img_size": 48, "crop_pct": 0.5, "interpolation": "bilinear"}
    assert pp.overridden_by(data_cfg, fields) == pp.overridden(img_size=48, crop_pct=0.5)
    assert pp.overridden(img_size=None, interpolation="bilinear").interpolation == "bilinear"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"crop_pct": 1.5}, "crop_pct=1.5"),
        ({"interpolation": "nearest"}, "interpolation='nearest'"),
        ({"img_size": 0}, "img_size=0"),
    ],
)
def test_invalid_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        PUBLISHED.overridden(**bad)
