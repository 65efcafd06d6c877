"""train.py and sample.py end to end through their real command lines, on configs/tiny.yaml."""

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import PROCESS_ENV, ROOT, run_in_process
from training.distributed import epoch_batches

pytestmark = pytest.mark.slow  # real processes (see pyproject.toml's markers)


def run(*args, check=True):
    proc = subprocess.run(list(args), cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sample_in_process(*args) -> str:
    """sample.py run in this process (tests/helpers.py): what it printed."""
    printed = io.StringIO()
    status, stderr = run_in_process("sample.py", list(args), {}, ROOT, stdout=printed)
    assert status == 0, stderr[-3000:]
    return printed.getvalue()


def test_epoch_batches_are_disjoint_shards():
    world, batch = 3, 7
    shards = [epoch_batches(100, seed=0, epoch=1, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    assert all(s.shape == (100 // (batch * world), batch) for s in shards)
    seen = torch.cat([s.flatten() for s in shards])
    assert len(set(seen.tolist())) == len(seen)  # no image on two ranks
    assert not torch.equal(epoch_batches(100, 0, 1, 0, world, batch), epoch_batches(100, 0, 2, 0, world, batch))
    assert torch.equal(epoch_batches(100, 0, 1, 0, world, batch), shards[0])


def test_training_writes_checkpoints_samples_and_metrics(tiny_run):
    ckpts = sorted((tiny_run / "checkpoints").glob("checkpoint_epoch_*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint_epoch_0001.pt", "checkpoint_epoch_0002.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 16  # 512 images / 64 per step x 2 epochs
    assert state["config"]["widths"] == [16, 32] and state["text_encoder"]["weights"] == "random"
    grid = Image.open(tiny_run / "samples" / "samples_epoch_0002.png")
    assert grid.height == 10 * 56  # one row per digit, tiles scaled 2x
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 8 and all(0 < x < 2 for x in losses)
    assert losses[-1] < losses[0]  # it learns something even in 16 steps


def test_sample_cli_is_reproducible(tiny_run, tmp_path):
    """The same seed gives the same PNG in a fresh process and in this one (after other work); another seed does not."""
    base = ("sample.py", "--output_dir", str(tiny_run), "--steps", "5", "--num_samples", "3")
    prompts = ("--prompt", "7", "--prompt", "a handwritten two")
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert run(sys.executable, *base, *prompts, "--out", str(a)).stdout.strip() == str(a)
    assert sample_in_process(*base[1:], *prompts, "--out", str(b)).strip() == str(b)
    sample_in_process(*base[1:], *prompts, "--out", str(c), "--seed", "1")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(a) == digest(b) and digest(a) != digest(c)
    assert Image.open(a).height == 2 * 56


def test_sample_default_path_is_under_output_dir(tiny_run):
    out = Path(sample_in_process("--prompt", "7", "--output_dir", str(tiny_run), "--steps", "2").strip())
    assert out.parent == tiny_run / "samples" and out.is_file()


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
