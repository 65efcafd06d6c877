"""slurm/train.sbatch on a real SLURM: two nodes on this machine, started by slurm/local_cluster.sh.

Each case submits the script for configs/tiny.yaml on the CPU (gloo) across 2 nodes x 2 processes
and follows the job with `scontrol show job` (there is no sacct without accounting): a run sent the
pre-emption warning mid-epoch (its second attempt is a plain run to the end), and a run on a node
without the data. Skipped, with the reason, only where SLURM cannot run: not root, or Debian's
slurmctld, slurmd, slurm-client and munge are not installed (tests/system_packages.sh installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data.mnist import load_mnist
from models.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow  # real processes (see pyproject.toml's markers)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
SCRIPT = ROOT / "slurm" / "train.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 300


def missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "SLURM's slurmd and munged must be started as root"
    missing = [name for name in DAEMONS if not shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin")]
    if missing:
        return (
            f"{', '.join(missing)} not installed: apt-get install -y --no-install-recommends "
            "slurmctld slurmd slurm-client munge"
        )
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """A running two-node cluster: submit the sbatch script, read and wait for job states."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        self.env.update(SLURM_CONF=str(folder / "slurm.conf"), PATH=os.environ["PATH"] + ":/usr/sbin")

    def run(self, *command: str) -> str:
        return subprocess.run(command, env=self.env, check=True, capture_output=True, text=True).stdout

    def submit(self, work: Path, train_args: str, **env_vars: str) -> str:
        env = dict(
            self.env,
            **env_vars,
            CONFIG="configs/tiny.yaml",
            OUTPUT_DIR=str(work / "out"),
            LOG_DIR=str(work / "logs"),
            NPROC_PER_NODE="2",
            PYTHON=sys.executable,
            TRAIN_ARGS=f"--device cpu {train_args}",
        )
        command = [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--cpus-per-task=2",
            "--gpus-per-node=0",
            "--time=10",
            f"--output={work}/slurm-%j.out",
            str(SCRIPT),
        ]
        return subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id)))

    def wait(self, job_id: str, until, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Poll every 0.5 s until ``until(job)`` or a final state; cancel the job on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job) or job["JobState"] in FINAL_STATES:
                return job
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s")

    def stop_jobs(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for _ in range(60):
            if not self.run("squeue", "-h", "-t", "running,completing"):
                return
            time.sleep(0.5)


def tail(folder: Path, lines: int = 20) -> str:
    return "".join(f"\n--- {p}\n" + "\n".join(p.read_text().splitlines()[-lines:]) for p in sorted(folder.glob("*")))


@pytest.fixture(scope="module")
def cluster():
    reason = missing_requirement()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="text2digit-slurm-"))
    folder.chmod(0o755)  # munged runs as the munge user and must reach its socket in here
    ctld, *slurmd = free_ports(3)
    env = dict(os.environ, SLURMCTLD_PORT=str(ctld), SLURMD_PORTS=" ".join(map(str, slurmd)))
    cluster = Cluster(folder)
    try:
        started = subprocess.run([str(CLUSTER), "start", str(folder)], env=env, capture_output=True, text=True)
        assert started.returncode == 0, f"local_cluster.sh start failed: {started.stderr}{tail(folder / 'log')}"
        load_mnist()  # what prefetch.py does on a login node: the offline jobs read this cache (no CLIP needed)
        yield cluster
    finally:
        cluster.stop_jobs()
        subprocess.run([str(CLUSTER), "stop", str(folder)], env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def attempt_logs(work: Path) -> list[str]:
    """The text of each attempt's timestamped log, oldest first."""
    return [p.read_text() for p in sorted((work / "logs").glob("*.log"))]


def metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]


def assert_trained(work: Path, epochs: int, steps_per_epoch: int) -> None:
    """Every step logged once (log_every 1) and every epoch ended once, the last checkpoint holds the last
    epoch, a sample grid was written."""
    records = metrics(work)
    assert [r["epoch"] for r in records if "epoch_loss" in r] == list(range(1, epochs + 1))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, epochs * steps_per_epoch + 1))
    assert load_checkpoint(latest_checkpoint(work / "out"))["epoch"] == epochs
    grid = Image.open(work / "out" / "samples" / f"samples_epoch_{epochs:04d}.png")
    assert grid.width > 28 and grid.height > 10 * 28  # one row per digit


def test_preemption_warning_checkpoints_requeues_and_resumes(cluster, tmp_path):
    start = time.monotonic()
    args = (
        "--num_epochs 2 --train_subset 768 --batch_size 64 --log_every 1 --stop_check_every 1 "
        "--checkpoint_every_steps 1"
    )
    job_id = cluster.submit(tmp_path, args)
    job = cluster.wait(job_id, lambda job: latest_checkpoint(tmp_path / "out") is not None)
    assert job["JobState"] == "RUNNING", f"job {job_id} {job['JobState']} before its first checkpoint"
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # what --signal=B:USR1@300 sends
    signalled = time.monotonic() - start
    job = cluster.wait(job_id, lambda job: False)
    logs = attempt_logs(tmp_path)
    print(
        f"job {job_id}: signalled at {signalled:.0f} s, {job['JobState']} exit {job['ExitCode']} "
        f"restarts {job['Restarts']} in {time.monotonic() - start:.0f} s (last attempt RunTime {job['RunTime']})"
    )
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", logs
    assert job["Restarts"] == "1" and len(logs) == 2, logs
    for log in logs:  # each attempt ran on both nodes, 2 processes each
        for node in (0, 1):  # srun --label numbers the nodes' lines
            assert re.search(rf"^{node}: environment check on", log, re.M), log
        assert re.search(r"\bworld size 4\b", log), log  # train.py's own count: 2 nodes x 2 processes
    assert "SIGUSR1" in logs[0] and "requeueing" in logs[0], logs[0]
    [stopped] = [r["step"] for r in metrics(tmp_path) if r.get("event") == "stopped"]
    # The second attempt starts at the step the first one stopped after, not at an earlier checkpoint.
    assert re.search(rf"resumed from \S+ at step {stopped}\b", logs[1]), logs[1]
    assert_trained(tmp_path, epochs=2, steps_per_epoch=768 // (64 * 4))


def test_offline_node_without_the_data_fails_fast_naming_the_fix(cluster, tmp_path):
    start = time.monotonic()
    job_id = cluster.submit(tmp_path, "--num_epochs 1", MNIST_CACHE_DIR=str(tmp_path / "empty-cache"))
    job = cluster.wait(job_id, lambda job: False)
    [log] = attempt_logs(tmp_path)
    print(f"job {job_id}: {job['JobState']} exit {job['ExitCode']} in {time.monotonic() - start:.0f} s")
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log
    assert "FAIL  mnist" in log and "prefetch.py" in log and "training starts" not in log, log
    assert not (tmp_path / "out").exists()
