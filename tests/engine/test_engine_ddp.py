"""DDP through the engine's set-up (torchrun, gloo, 2 CPU processes) gives one process's gradients."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

WORKER = """
    import copy, sys, torch
    import torch.nn.functional as F
    import res2net
    from res2net.engine import distributed

    with distributed.process_group() as info:
        assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
        torch.manual_seed(0)
        model = res2net.create_model("res2net50_26w_4s", num_classes=5, base_width=4, layers=[1, 1, 1, 1])
        with torch.no_grad():  # non-trivial BN weights and running statistics, the same on both ranks
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
                    m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
        single = copy.deepcopy(model)
        ddp = distributed.wrap_model(model, info)
        ddp.eval()  # BatchNorm uses its running statistics, so splitting the batch cannot change the result
        gen = torch.Generator().manual_seed(1)
        images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        half = slice(4 * info.rank, 4 * info.rank + 4)
        F.cross_entropy(ddp(images[half]), labels[half]).backward()
        if info.is_main:
            single.eval()
            F.cross_entropy(single(images), labels).backward()
            torch.save({"ddp": {n: p.grad for n, p in model.named_parameters()},
                        "single": {n: p.grad for n, p in single.named_parameters()}}, sys.argv[1])
"""


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "grads.pth"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    grads = torch.load(out, weights_only=True)
    assert grads["ddp"].keys() == grads["single"].keys() and len(grads["ddp"]) > 50
    for name, single in grads["single"].items():
        assert single is not None and single.abs().sum() > 0, name
        torch.testing.assert_close(grads["ddp"][name], single, rtol=1e-4, atol=1e-6, msg=name)
