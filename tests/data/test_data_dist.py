"""Both backends under a real `torchrun --nproc_per_node=2` with gloo: val covers every image exactly once over
the ranks, train shards are disjoint and equally long."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_data_helpers import write_colour_split

pytest.importorskip("nvidia.dali")

WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from res2net.data import DataConfig, build_loader
    from test_data_helpers import colour_ids

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root, out = sys.argv[1], sys.argv[2]
    result = {}
    for backend in ("torchvision", "dali"):
        cfg = DataConfig(root=root, backend=backend, batch_size=8, num_workers=1, img_size=32)
        val = build_loader(cfg, "val", rank=rank, world_size=world)
        count = torch.tensor([sum(len(y) for _, y in val)])
        dist.all_reduce(count)
        val_paths = [None] * world
        dist.all_gather_object(val_paths, val.paths)
        train = build_loader(cfg, "train", rank=rank, world_size=world, seed=11)
        train.set_epoch(2)
        ids = [i for x, _ in train for i in colour_ids(x, cfg.mean, cfg.std)]
        train_ids = [None] * world
        dist.all_gather_object(train_ids, (len(train), ids))
        result[backend] = {"count": int(count), "val_paths": val_paths, "train": train_ids}
        val.close()
        train.close()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # leave together (see res2net.engine.distributed.process_group)
    dist.destroy_process_group()
""")


def test_torchrun_two_ranks_gloo(tmp_path):
    root = tmp_path / "data"
    write_colour_split(root, "train", 41)
    val_paths = write_colour_split(root, "val", 101)
    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    repo, tests = Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(repo), str(tests)]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(root),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for backend in ("torchvision", "dali"):
        r = result[backend]
        assert r["count"] == 101
        assert r["val_paths"][0] + r["val_paths"][1] == sorted(val_paths)  # every image once, in order
        (len0, ids0), (len1, ids1) = r["train"]
        assert len0 == len1 == 2 and len(ids0) == len(ids1) == 16  # floor(41 / 2) = 20 -> 2 batches of 8
        assert not set(ids0) & set(ids1)
    assert result["dali"]["train"] == result["torchvision"]["train"]  # same order in both backends
