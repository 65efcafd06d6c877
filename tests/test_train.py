"""train.py and sample.py end to end through their real command lines, on configs/tiny.yaml."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import ROOT
from training.distributed import epoch_batches

pytestmark = pytest.mark.slow  # real processes (see pyproject.toml's markers)


def run(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    run(sys.executable, "train.py", "--config", "configs/tiny.yaml", "--output_dir", str(out))
    return out


def test_epoch_batches_are_disjoint_shards():
    world, batch = 3, 7
    shards = [epoch_batches(100, seed=0, epoch=1, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    assert all(s.shape == (100 // (batch * world), batch) for s in shards)
    seen = torch.cat([s.flatten() for s in shards])
    assert len(set(seen.tolist())) == len(seen)  # no image on two ranks
    assert not torch.equal(epoch_batches(100, 0, 1, 0, world, batch), epoch_batches(100, 0, 2, 0, world, batch))
    assert torch.equal(epoch_batches(100, 0, 1, 0, world, batch), shards[0])


def test_training_writes_checkpoints_samples_and_metrics(trained):
    ckpts = sorted((trained / "checkpoints").glob("checkpoint_epoch_*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint_epoch_0001.pt", "checkpoint_epoch_0002.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 16  # 512 images / 64 per step x 2 epochs
    assert state["config"]["widths"] == [16, 32] and state["text_encoder"]["weights"] == "random"
    grid = Image.open(trained / "samples" / "samples_epoch_0002.png")
    assert grid.height == 10 * 56  # one row per digit, tiles scaled 2x
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 8 and all(0 < x < 2 for x in losses)
    assert losses[-1] < losses[0]  # it learns something even in 16 steps


def test_sample_cli_is_reproducible(trained, tmp_path):
    base = (sys.executable, "sample.py", "--output_dir", str(trained), "--steps", "5", "--num_samples", "3")
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    out = run(*base, "--prompt", "7", "--prompt", "a handwritten two", "--out", str(a)).stdout.strip()
    assert out == str(a)
    run(*base, "--prompt", "7", "--prompt", "a handwritten two", "--out", str(b))
    run(*base, "--prompt", "7", "--prompt", "a handwritten two", "--out", str(c), "--seed", "1")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(a) == digest(b) and digest(a) != digest(c)
    assert Image.open(a).height == 2 * 56


def test_sample_default_path_is_under_output_dir(trained):
    out = Path(
        run(sys.executable, "sample.py", "--prompt", "7", "--output_dir", str(trained), "--steps", "2").stdout.strip()
    )
    assert out.parent == trained / "samples" and out.is_file()


def test_ddp_two_processes_stay_in_sync(tmp_path):
    run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port for the rendezvous
        "--nproc_per_node=2",
        "train.py",
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--num_epochs",
        "1",
    )
    epoch = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch_loss" in line]
    assert epoch == [pytest.approx({**epoch[0], "world_size": 2, "ranks_in_sync": True})]
    state = torch.load(tmp_path / "checkpoints" / "checkpoint_epoch_0001.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2  # 512 images / (64 x 2 ranks)
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
