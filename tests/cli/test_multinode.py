"""Two 'nodes' on this machine: two torchrun agents meet through a c10d rendezvous on 127.0.0.1 and train together.

Each agent runs one CPU process (gloo), as one process per node would on two machines. With deterministic kernels
the two-node job must end with exactly the weights of the same job run as two processes of one torchrun, which
shows that the two agents formed one world of two ranks that exchanged gradients every step.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from test_launchers import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN = [
    str(REPO / "train.py"),
    "data=folder",
    "data.img_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.layers=[1,1,1,1]",
    "model.base_width=4",
    "schedule.epochs=1",
    "trainer.max_steps=4",
    "trainer.deterministic=true",
    "trainer.log_interval=1",
]
TIMEOUT_S = 240


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_all(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_two_nodes_rendezvous_and_train_like_one_two_process_job(image_folder, tmp_path):
    port = free_port()
    node_args = [
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=test-two-nodes",
    ]
    two_nodes = tmp_path / "two_nodes"
    nodes = [
        torchrun([*node_args, *TRAIN, f"data.root={image_folder}", f"hydra.run.dir={two_nodes}"], tmp_path)
        for _ in range(2)
    ]
    outputs = wait_all(nodes)
    # one world: exactly one of the two agents ran rank 0, which reports; its validation counted all 20 images once
    reports = [out for out in outputs if "max_steps after 0 epochs (global step 4)" in out]
    assert len(reports) == 1, outputs
    assert f"(20 images of {image_folder.name})" in reports[0]

    one_node = tmp_path / "one_node"
    wait_all(
        [
            torchrun(
                [
                    "--standalone",
                    "--nproc-per-node=2",
                    *TRAIN,
                    f"data.root={image_folder}",
                    f"hydra.run.dir={one_node}",
                ],
                tmp_path,
            )
        ]
    )

    multi = torch.load(two_nodes / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    single = torch.load(one_node / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert multi["world_size"] == 2 and len(multi["rng"]) == 2  # one world: both ranks' RNG states were gathered
    assert multi["global_step"] == single["global_step"] == 4
    assert multi["model"].keys() == single["model"].keys()
    differing = [key for key in multi["model"] if not torch.equal(multi["model"][key], single["model"][key])]
    assert not differing, f"weights differ between the two-node and the one-node job: {differing[:5]}"
