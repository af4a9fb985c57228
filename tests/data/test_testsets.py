"""Evaluation sets read as distributed (res2net.data.testsets): V2's index folders, Sketch's and -R/-A's wnid folders
map to ImageNet-1k class indices in both backends; -R/-A are scored over their classes only; clear errors."""

import csv
from pathlib import Path

import pytest
import torch
from eval_set_helpers import SUBSET, tiny_1k_checkpoint, tiny_1k_model, write_class_folders
from hydra import compose, initialize_config_dir

from res2net.config import register_configs
from res2net.data.imagenet_wnids import IMAGENET1K_WNIDS
from res2net.data.testsets import eval_set_loader, scan_eval_set, scored_classes
from res2net.engine.eval_job import evaluate_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V2_CLASSES = ("0", "7", "10", "999")  # "10" sorts before "7" as a name: labels must not follow name order
BACKENDS = ("torchvision", "dali")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """One folder holding a small V2 (matched-frequency), Sketch (with a PNG), -R and -A, as their archives unpack."""
    root = tmp_path_factory.mktemp("testsets")
    write_class_folders(root / "imagenetv2-matched-frequency-format-val", list(V2_CLASSES), 2, seed=1, suffix=".jpeg")
    sketch = [IMAGENET1K_WNIDS[i] for i in (0, 321, 999)]
    write_class_folders(root / "sketch", sketch, 2, seed=2, suffix=".JPEG")
    write_class_folders(root / "sketch", sketch[:1], 1, seed=3, suffix=".png", file_name=lambda i: f"png_{i}")
    for name, seed in (("imagenet-r", 4), ("imagenet-a", 5)):
        write_class_folders(root / name, [IMAGENET1K_WNIDS[i] for i in SUBSET], 3, seed=seed)
    (root / "imagenet-a" / "README.txt").write_text("files beside the class folders are ignored\n")
    return root


def test_wnid_list_is_imagenet1k_sorted():
    from timm.data import ImageNetInfo  # reference: timm's own copy of the synsets

    assert list(IMAGENET1K_WNIDS) == ImageNetInfo().label_names()
    assert len(set(IMAGENET1K_WNIDS)) == 1000 and list(IMAGENET1K_WNIDS) == sorted(IMAGENET1K_WNIDS)


def _data_cfg(root, backend, **kw):
    return {"root": str(root), "backend": backend, "batch_size": 3, "num_workers": 0, "img_size": 32, **kw}


def _labels_by_path(loader) -> dict[str, int]:
    """Labels as the batches carry them, with the paths the loader names in the same order."""
    labels = torch.cat([targets for _, targets in loader]).tolist()
    assert len(labels) == len(loader.paths)
    return dict(zip(loader.paths, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_v2_index_folders_are_class_indices(roots, backend):
    samples = scan_eval_set(str(roots), "imagenet_v2", "matched-frequency")
    assert sorted({label for _, label in samples}) == [0, 7, 10, 999]
    loader = eval_set_loader(_data_cfg(roots, backend), samples)
    try:
        assert loader.classes == list(IMAGENET1K_WNIDS) and loader.num_classes == 1000
        by_path = _labels_by_path(loader)
    finally:
        loader.close()
    assert len(by_path) == 2 * len(V2_CLASSES)
    for path, label in by_path.items():
        assert label == int(Path(path).parent.name), path
    assert scored_classes("imagenet_v2", samples) is None  # scored over all 1,000 classes


@pytest.mark.parametrize("backend", BACKENDS)
def test_sketch_wnid_folders_map_to_imagenet1k_indices(roots, backend):
    samples = scan_eval_set(str(roots), "imagenet_sketch")
    loader = eval_set_loader(_data_cfg(roots, backend), samples)
    try:
        by_path = _labels_by_path(loader)
    finally:
        loader.close()
    assert len(by_path) == 7 and any(p.endswith(".png") for p in by_path)  # the PNG is decoded too
    for path, label in by_path.items():
        assert IMAGENET1K_WNIDS[label] == Path(path).parent.name
    assert sorted(set(by_path.values())) == [0, 321, 999]


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_r_and_a_are_scored_over_the_classes_present(roots, name, caplog):
    samples = scan_eval_set(str(roots), name)
    assert scored_classes(name, samples) == list(SUBSET)
    assert "holds 3 class folders; the whole set has 200" in caplog.text


def test_missing_folder_and_wrong_classes_are_clear_errors(tmp_path, roots):
    with pytest.raises(FileNotFoundError, match=r"imagenet-r.*does not exist.*extract.*hendrycks"):
        scan_eval_set(str(tmp_path), "imagenet_r")
    with pytest.raises(ValueError, match="testset_variant='matched'.*'matched-frequency' | 'threshold-0.7'"):
        scan_eval_set(str(roots), "imagenet_v2", "matched")
    with pytest.raises(ValueError, match="testset='imagenet_c'.*imagenet_sketch"):
        scan_eval_set(str(roots), "imagenet_c")
    with pytest.raises(ValueError, match="data.root is not set"):
        scan_eval_set(None, "imagenet_a")
    write_class_folders(tmp_path / "imagenet-a", ["n01440764", "goldfish"], 1, seed=0)
    with pytest.raises(ValueError, match=r"not ImageNet-1k wnids: \['goldfish'\]"):
        scan_eval_set(str(tmp_path), "imagenet_a")
    write_class_folders(tmp_path / "imagenetv2-top-images-format-val", ["3", "1000"], 1, seed=0)
    with pytest.raises(ValueError, match=r"not class indices 0 ... 999: \['1000'\]"):
        scan_eval_set(str(tmp_path), "imagenet_v2", "top-images")
    with pytest.raises(ValueError, match="synthetic has no evaluation sets"):
        eval_set_loader(_data_cfg(roots, "synthetic"), scan_eval_set(str(roots), "imagenet_r"))


def _eval_cfg(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                "data.img_size=32",
                "data.batch_size=4",
                "data.num_workers=0",
                "progress=false",
                "device=cpu",
                *overrides,
            ],
        )


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_subset_arg_max_never_leaves_the_subset_and_matches_a_hand_computation(tmp_path, roots, name):
    ckpt = tiny_1k_checkpoint(tmp_path / "tiny.pth")
    # fold_bn/channels_last off: the hand computation below runs the same unprepared model on the same batches
    cfg = _eval_cfg(
        f"data={name}",
        f"data.root={roots}",
        f"checkpoint={ckpt}",
        "save_predictions=true",
        "fold_bn=false",
        "channels_last=false",
    )
    out = evaluate_checkpoint(cfg, tmp_path / "out")
    assert out["dataset"] == name and out["count"] == 9 and out["published"] is None
    with open(tmp_path / "out" / "predictions.csv") as f:
        predicted = {r["path"]: int(r["top1"]) for r in csv.DictReader(f)}
    assert set(predicted.values()) <= set(SUBSET)

    model = tiny_1k_model(ckpt)
    loader = eval_set_loader(cfg.data, scan_eval_set(str(roots), name))
    unrestricted, by_hand, right = [], {}, 0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images)
            unrestricted += logits.argmax(1).tolist()
            picks = torch.tensor(SUBSET)[logits[:, list(SUBSET)].argmax(1)]
            right += int(picks.eq(targets).sum())
            by_hand.update(zip(loader.paths[len(by_hand) :], picks.tolist()))
    loader.close()
    assert predicted == by_hand
    assert out["top1"] == pytest.approx(100 * right / 9)
    assert not set(unrestricted) <= set(SUBSET)  # without the mask the model would leave the subset


def test_a_model_not_on_imagenet1k_is_refused(tmp_path, roots):
    import res2net

    model = res2net.create_model("res2net50_26w_4s", num_classes=3, layers=[1, 1, 1, 1], base_width=4)
    path = tmp_path / "three.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": {"name": "res2net50_26w_4s", "layers": [1, 1, 1, 1], "base_width": 4}},
        },
        path,
    )
    with pytest.raises(ValueError, match="labelled in ImageNet-1k's 1000 classes but the model predicts 3"):
        evaluate_checkpoint(_eval_cfg("data=imagenet_sketch", f"data.root={roots}", f"checkpoint={path}"), None)
    with pytest.raises(ValueError, match="real_labels applies to ImageNet val"):
        evaluate_checkpoint(_eval_cfg("data=imagenet_r", f"data.root={roots}", "real_labels=/x/real.json"), None)
