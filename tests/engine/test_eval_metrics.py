"""What evaluate() counts beyond top-k, against hand computations on fixed logits: ECE (15 bins), NLL, the class
mask of the 200-class sets, ReaL labels, and flip TTA against a manual average."""

import json
import math

import pytest
import torch
from torch import nn

from res2net.engine.eval_loop import evaluate
from res2net.engine.eval_metrics import (
    ECE_BINS,
    class_mask,
    expected_calibration_error,
    read_real_labels,
    real_label_rows,
)

# Fixed logits over 3 classes, their targets, and (worked out by hand) the max softmax probability, whether the
# arg-max is right, and its ECE bin (bin i holds (i / 15, (i + 1) / 15]).
# Images 3 and 5 share a bin of 15 but not of 10, so another bin count gives another ECE.
LOGITS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 3.0, 2.0], [2.05, 0.0, 0.0], [1.5, 0.0, 0.0]]
TARGETS = [0, 2, 1, 1, 1, 2]
CONFIDENCE = [
    math.exp(2) / (math.exp(2) + 2),
    math.e / (math.e + 2),
    math.exp(3) / (math.exp(3) + 2),
    math.exp(3) / (math.e + math.exp(2) + math.exp(3)),
    math.exp(2.05) / (math.exp(2.05) + 2),
    math.exp(1.5) / (math.exp(1.5) + 2),
]
RIGHT = [True, False, False, True, False, False]
BINS = [11, 8, 13, 9, 11, 10]


class Fixed(nn.Module):
    """Returns row i of `logits` for the input value i (one scalar per image)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.num_classes = self.logits.shape[1]

    def forward(self, x):
        return self.logits[x.view(-1).long()]


class Batches:
    """A loader of image indices 0..n-1 in batches of 2, named like ImageNet val files (1-based)."""

    def __init__(self, targets, num_classes):
        self.targets, self.num_classes = torch.tensor(targets), num_classes
        self.paths = [f"n0000000{t}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, t in enumerate(targets)]

    def __iter__(self):
        for s in range(0, len(self.targets), 2):
            yield torch.arange(s, min(s + 2, len(self.targets))).float().view(-1, 1), self.targets[s : s + 2]


def test_hand_worked_bins_are_right():
    for conf, b in zip(CONFIDENCE, BINS):
        assert b / ECE_BINS < conf <= (b + 1) / ECE_BINS
    logits = torch.tensor(LOGITS)
    assert logits.argmax(1).eq(torch.tensor(TARGETS)).tolist() == RIGHT


def test_ece_and_nll_against_a_hand_computation():
    r = evaluate(Fixed(LOGITS), Batches(TARGETS, 3), device="cpu")
    # bin 11: two images, one right; bins 8, 10, 13: one wrong image each; bin 9: one right image
    c = CONFIDENCE
    ece = (
        2 / 6 * abs(0.5 - (c[0] + c[4]) / 2)
        + 1 / 6 * abs(0 - c[1])
        + 1 / 6 * abs(0 - c[2])
        + 1 / 6 * abs(1 - c[3])
        + 1 / 6 * abs(0 - c[5])
    )
    assert r["ece"] == pytest.approx(ece, rel=1e-6)
    nll = [-math.log(torch.tensor(row).softmax(0)[t].item()) for row, t in zip(LOGITS, TARGETS)]
    assert r["nll"] == pytest.approx(sum(nll) / 6, rel=1e-6) and r["loss"] == r["nll"]
    assert r["top1"] == pytest.approx(100 * 2 / 6)
    # the same formula, from counts: a model that is always right with confidence 1 is perfectly calibrated
    assert expected_calibration_error([0] * 14 + [4], [0] * 14 + [4], [0.0] * 14 + [4.0]) == 0.0


def test_class_subset_restricts_the_arg_max():
    # 5 classes; only 1 and 3 may be predicted. Unrestricted, rows 0 and 2 would pick classes 0 and 4.
    logits = [[5.0, 1.0, 0.0, 2.0, 0.0], [0.0, 0.5, 9.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0, 7.0]]
    targets = [3, 3, 1]
    r = evaluate(Fixed(logits), Batches(targets, 5), device="cpu", class_subset=[1, 3], collect_predictions=True)
    top1 = [p["top5"][0] for p in r["predictions"]]
    assert top1 == [3, 3, 1]  # by hand: the larger of columns 1 and 3
    assert torch.tensor(logits).argmax(1).tolist() == [0, 2, 4]  # what an unrestricted arg-max would say
    assert r["top1"] == pytest.approx(100.0)
    # NLL over the two allowed classes: -log(e^a / (e^a + e^b))
    nll = [math.log(1 + math.exp(1 - 2)), math.log(1 + math.exp(0.5 - 1)), math.log(1 + math.exp(1 - 2))]
    assert r["nll"] == pytest.approx(sum(nll) / 3, rel=1e-6)
    for p in r["predictions"]:
        assert sum(p["top5_prob"][:2]) == pytest.approx(1.0, rel=1e-6) and p["top5_prob"][2] == 0.0
    with pytest.raises(ValueError, match="class indices in"):
        class_mask(5, [1, 7], torch.device("cpu"))


def test_real_labels_against_a_hand_count(tmp_path):
    # arg-max per image: 0, 1, 0, 1, 0, 0 (image 4 of LOGITS: argmax of [1, 3, 2] is 1); top-5 = all 3 classes
    real = [[0], [], [1, 2], [0, 2], [], [2, 1, 0], [2]]  # one list more than images: real.json covers all of val
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    loader = Batches(TARGETS, 3)
    rows = real_label_rows(read_real_labels(path), loader.paths, 3)
    assert rows.tolist() == [[0, -1, -1], [-1, -1, -1], [1, 2, -1], [0, 2, -1], [-1, -1, -1], [2, 1, 0]]
    r = evaluate(Fixed(LOGITS), loader, device="cpu", real_labels=rows)
    # images 1, 3, 4, 6 have lists: 0 in [0] yes, 0 in [1, 2] no, 1 in [0, 2] no, 0 in [2, 1, 0] yes;
    # images 2 and 5 (empty lists) are left out
    assert r["real_count"] == 4
    assert r["real_top1"] == pytest.approx(50.0)
    assert r["real_top5"] == pytest.approx(100.0)  # 3 classes: every list meets the top-5
    assert r["count"] == 6 and r["top1"] == pytest.approx(100 * 2 / 6)  # the original labels as before


def test_real_label_errors_name_the_file_and_what_to_do(tmp_path):
    bad = tmp_path / "real.json"
    bad.write_text(json.dumps({"ILSVRC2012_val_00000001.JPEG": [1]}))
    with pytest.raises(ValueError, match="list of lists"):
        read_real_labels(bad)
    with pytest.raises(ValueError, match="reassessed-imagenet"):
        read_real_labels(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not an ImageNet val file"):
        real_label_rows([[1]], ["val/n01440764/img_0001.jpg"], 3)
    with pytest.raises(ValueError, match="has 1 lists, none for"):
        real_label_rows([[1]], ["ILSVRC2012_val_00000002.JPEG"], 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        real_label_rows([[5]], ["ILSVRC2012_val_00000001.JPEG"], 3)


def test_flip_tta_is_the_mean_of_the_two_softmaxes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)).eval()
    net.num_classes = 6
    images, targets = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 0])

    class Loader:
        num_classes = 6

        def __iter__(self):
            yield images[:4], targets[:4]
            yield images[4:], targets[4:]

    r = evaluate(net, Loader(), device="cpu", tta="flip", collect_predictions=True)
    with torch.no_grad():
        probs = (net(images).softmax(1) + net(images.flip(3)).softmax(1)) / 2
        plain = net(images).softmax(1)
    top = probs.topk(5, dim=1)
    assert [p["top5"] for p in r["predictions"]] == top.indices.tolist()
    for p, v in zip(r["predictions"], top.values.tolist()):
        assert p["top5_prob"] == pytest.approx(v, rel=1e-5)
    assert r["nll"] == pytest.approx(-probs[torch.arange(7), targets].log().mean().item(), rel=1e-5)
    assert not torch.allclose(probs, plain, atol=1e-3)  # the mirror changed the scores: the test can fail
    with pytest.raises(ValueError, match="tta='crop'"):
        evaluate(net, Loader(), device="cpu", tta="crop")


def test_real_scoring_matches_timm_reference(tmp_path):
    from timm.data import RealLabelsImagenet  # timm's validate.py scorer, as a reference

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 10, generator=g)
    targets = torch.randint(0, 10, (20,), generator=g).tolist()
    real = [torch.randperm(10, generator=g)[: i % 4].tolist() for i in range(20)]  # 0 to 3 labels each
    (tmp_path / "real.json").write_text(json.dumps(real))
    loader = Batches(targets, 10)
    reference = RealLabelsImagenet(loader.paths, real_json=str(tmp_path / "real.json"))
    reference.add_result(logits)
    r = evaluate(
        Fixed(logits.tolist()),
        loader,
        device="cpu",
        real_labels=real_label_rows(read_real_labels(tmp_path / "real.json"), loader.paths, 10),
    )
    assert r["real_count"] == 15
    assert r["real_top1"] == pytest.approx(reference.get_accuracy(1))
    assert r["real_top5"] == pytest.approx(reference.get_accuracy(5))
    assert 0 < r["real_top1"] < r["real_top5"] < 100
