"""The count-exact evaluation loop: top-k and loss by hand, and world size 2 (real gloo processes) == world size 1,
also with flip TTA, a class subset and ReaL labels."""

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from res2net.data.index import val_shard
from res2net.engine.eval_loop import evaluate
from res2net.engine.eval_metrics import real_label_rows

NUM_CLASSES = 7
NUM_IMAGES = 101  # prime: no world size or batch size divides it


class ListLoader:
    """In-memory loader with the val-loader protocol: this rank's contiguous shard (sizes differ by at most one)."""

    def __init__(self, images, targets, batch_size, rank=0, world_size=1):
        start, stop = val_shard(len(targets), rank, world_size)
        index = list(range(start, stop))
        self.images, self.targets = images[index], targets[index]
        self.paths = [f"class{int(targets[i])}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in index]
        self.batch_size, self.num_classes = batch_size, NUM_CLASSES
        self.num_samples = len(index)

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        for s in range(0, self.num_samples, self.batch_size):
            yield self.images[s : s + self.batch_size], self.targets[s : s + self.batch_size]


def _dataset():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_IMAGES, 3, 8, 8, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=g)
    return images, targets


# ReaL lists of the 101 images: empty, single and multiple labels in turn
REAL = [
    [] if i % 3 == 0 else [i % NUM_CLASSES] if i % 3 == 1 else [i % NUM_CLASSES, (i + 2) % NUM_CLASSES]
    for i in range(NUM_IMAGES)
]
OPTIONS = {"plain": {}, "tta_subset_real": {"tta": "flip", "class_subset": [0, 2, 3, 6], "real": True}}


def _options(name, loader):
    options = dict(OPTIONS[name])
    if options.pop("real", False):
        options["real_labels"] = real_label_rows(REAL, loader.paths, NUM_CLASSES)
    return options


def _model():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, NUM_CLASSES))
    net.num_classes = NUM_CLASSES
    return net


def test_evaluate_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 2.0]])
    targets = torch.tensor([0, 2, 1, 1])

    class Fixed(nn.Module):
        num_classes = 3

        def forward(self, x):
            return logits[x.view(-1).long()]

    class Loader:
        num_classes, paths = 3, ["a", "b", "c", "d"]

        def __iter__(self):  # two batches: 3 + 1
            yield torch.tensor([0.0, 1, 2]).view(3, 1), targets[:3]
            yield torch.tensor([3.0]).view(1, 1), targets[3:]

    r = evaluate(Fixed(), Loader(), device="cpu", collect_predictions=True)
    # CE per row: -log softmax[target]
    ce = [
        math.log(1 + 2 * math.exp(-2)),
        math.log(math.exp(1) + 2),
        math.log(3),
        math.log(math.exp(1) + math.exp(3) + math.exp(2)) - 3,
    ]
    assert r["loss"] == pytest.approx(sum(ce) / 4, rel=1e-6)
    # top-1 hits: rows 0 and 3 (row 2 is a three-way tie: topk picks index 0, not target 1)
    assert r["count"] == 4 and r["top1"] == pytest.approx(50.0) and r["top5"] == pytest.approx(100.0)
    assert r["per_class_count"] == [1, 2, 1] and r["per_class_correct"] == [1, 1, 0]
    preds = r["predictions"]
    assert [p["path"] for p in preds] == ["a", "b", "c", "d"] and [p["target"] for p in preds] == [0, 2, 1, 1]
    assert preds[3]["top5"] == [1, 2, 0]
    assert sum(preds[3]["top5_prob"]) == pytest.approx(1.0, rel=1e-6)


def test_evaluate_restores_training_mode_and_rejects_bad_amp():
    images, targets = _dataset()
    model = _model().train()
    evaluate(model, ListLoader(images, targets, 16), device="cpu")
    assert model.training
    with pytest.raises(ValueError, match="amp='fp8'"):
        evaluate(model, ListLoader(images, targets, 16), device="cpu", amp="fp8")


def test_evaluate_bf16_close_to_fp32():
    images, targets = _dataset()
    model = _model()
    a = evaluate(model, ListLoader(images, targets, 32), device="cpu")
    b = evaluate(model, ListLoader(images, targets, 32), device="cpu", amp="bf16", channels_last=True)
    assert b["count"] == a["count"] == NUM_IMAGES
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_path, options):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        images, targets = _dataset()
        loader = ListLoader(images, targets, batch_size=16, rank=rank, world_size=world_size)
        result = evaluate(_model(), loader, device="cpu", collect_predictions=True, **_options(options, loader))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
        else:
            assert result["predictions"] is None
        dist.barrier()  # leave together (see res2net.engine.distributed.process_group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_two_gloo_processes_match_world_size_one(tmp_path, options):
    images, targets = _dataset()
    loader = ListLoader(images, targets, batch_size=16)
    single = evaluate(_model(), loader, device="cpu", collect_predictions=True, **_options(options, loader))
    out = tmp_path / "rank0.json"
    mp.start_processes(_worker, args=(2, _free_port(), str(out), options), nprocs=2, join=True, start_method="spawn")
    multi = json.loads(out.read_text())
    assert single["count"] == multi["count"] == NUM_IMAGES  # shards of 51 and 50: 4 batches each
    exact = ["top1", "top5", "per_class_correct", "per_class_count"]
    if "real" in OPTIONS[options]:
        exact += ["real_top1", "real_top5", "real_count"]
        assert single["real_count"] == sum(1 for r in REAL if r)
        assert 0 < single["real_top1"] < 100
    for key in exact:
        assert multi[key] == single[key], key
    for key in ("loss", "nll", "ece"):
        assert multi[key] == pytest.approx(single[key], rel=1e-6), key
    assert [p["path"] for p in multi["predictions"]] == [p["path"] for p in single["predictions"]]
    assert [p["top5"] for p in multi["predictions"]] == [p["top5"] for p in single["predictions"]]
    for m, s in zip(multi["predictions"], single["predictions"]):
        assert m["top5_prob"] == pytest.approx(s["top5_prob"], rel=1e-5)
    # not a vacuous comparison: the model is better than nothing on some classes and worse on others
    assert 0 < single["top1"] < 100


def test_a_compiled_model_is_evaluated_compiled():
    """evaluate() unwraps only DDP: a torch.compile'd model runs its compiled graph (the loop used to strip
    ``_orig_mod`` too and silently run eager), with the same numbers as the eager model."""
    calls = []

    def counting_backend(graph, example_inputs):
        def run(*args):
            calls.append(1)
            return graph.forward(*args)

        return run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES))
    model.num_classes = NUM_CLASSES
    images, targets = _dataset()
    loader = ListLoader(images, targets, batch_size=101)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    on_compiled = evaluate(compiled, loader, device="cpu")
    assert len(calls) == 1  # one batch, through the compiled graph
    eager = evaluate(model, loader, device="cpu")
    assert on_compiled["top1"] == eager["top1"] and on_compiled["count"] == NUM_IMAGES
    assert on_compiled["loss"] == pytest.approx(eager["loss"], abs=1e-5)
