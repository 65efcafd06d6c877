"""Exact resume: the training state beyond the weights, and whether a run may continue from a checkpoint.

Besides model, EMA, optimizer and LR schedule, a checkpoint records where the data order stood
(the epoch and the batches done in it; the order itself is recomputed from (seed, epoch)) and
every random state of every rank: Python's, NumPy's, torch's CPU and CUDA generators and the
rank's own training generator. A run resumed from it takes bitwise the same steps as a run that
never stopped.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError
from fileio import atomic_write
from models.checkpoint import latest_checkpoint, load_checkpoint
from models.loading import with_layout_defaults

# Config keys that fix the shapes and meaning of the weights: they must match to resume at all.
ARCHITECTURE_KEYS = ("widths", "attention", "layers_per_block", "head_dim", "ff_mult", "extra_up_block", "patch_size",
                     "num_train_timesteps", "prediction")
# Config keys that fix the data order within an epoch: they must match to resume mid-epoch.
DATA_ORDER_KEYS = ("seed", "train_subset", "batch_size")
RESUME_KEYS = ("model", "ema", "optimizer", "scheduler", "rng", "epoch", "epoch_step", "steps_per_epoch", "step",
               "world_size", "loss_sums", "window_steps", "bad_steps")


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state of this process, as plain data (``weights_only`` loads it)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    cuda = generator.device.type == "cuda"
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(generator.device) if cuda else None,
        "python": random.getstate(),
        "numpy": {"name": name, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }


def restore_rng(states: list[dict[str, Any]], rank: int, world_size: int, generator: torch.Generator) -> None:
    """Restore this rank's random states from a checkpoint's list of them.

    After a change of world size (``load_resumable`` allows it only at an epoch end) the ranks
    keep their fresh seeds instead: the run goes on, but no longer bitwise as before.
    """
    if len(states) != world_size:
        if rank == 0:
            print(f"note: world size changed from {len(states)} to {world_size}; the ranks' random streams "
                  "start afresh", file=sys.stderr)
        return
    state = states[rank]
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], generator.device)
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], np.array(numpy["key"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))


def gather_rng(generator: torch.Generator, world_size: int) -> list[dict[str, Any]]:
    """Every rank's random states, in rank order (a collective: every rank must call it)."""
    states = [capture_rng(generator)]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, capture_rng(generator))
    return states


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: None (start fresh), "latest", "auto" (latest if any) or a path."""
    if resume is None:
        return None
    if resume not in ("latest", "auto"):
        return Path(resume)
    path = latest_checkpoint(output_dir)
    if path is None and resume == "latest":
        raise UserError(f"--resume found no checkpoint in {output_dir / 'checkpoints'}; "
                        "drop --resume to start fresh, or pass --resume auto")
    return path


def load_resumable(path: Path, cfg: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Load ``path`` on the CPU and raise UserError unless this run (``cfg``, ``world_size``) can continue it."""
    state = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise UserError(f"{path} cannot be resumed: it lacks {', '.join(missing)} (an older train.py wrote it); "
                        "start fresh, or only sample from it")
    _require_same(path, with_layout_defaults(state["config"]), cfg, ARCHITECTURE_KEYS,
                  "the config it was trained with (same --config)")
    if state["epoch_step"] < state["steps_per_epoch"]:
        saved, now = {**state["config"], "world_size": state["world_size"]}, {**cfg, "world_size": world_size}
        _require_same(path, saved, now, DATA_ORDER_KEYS + ("world_size",),
                      "the same values (they fix the data order within an epoch), or an epoch-end checkpoint")
    return state


def _require_same(path: Path, saved: dict, now: dict, keys: tuple[str, ...], fix: str) -> None:
    for key in keys:
        if saved[key] != now[key]:
            raise UserError(f"{path} was written with {key}={saved[key]!r} but this run has {key}={now[key]!r}; "
                            f"resume with {fix}")


def resume_position(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, batch) at which training continues after ``state``."""
    if state["epoch_step"] == state["steps_per_epoch"]:
        return state["epoch"] + 1, 0
    return state["epoch"], state["epoch_step"]


def rewind_metrics(output_dir: Path, step: int) -> None:
    """Drop the metrics records after ``step`` that a killed run logged: the resumed run logs them again."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_by_step(line, step)]
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _logged_by_step(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:  # the last line of a run killed while appending it
        return False
