"""Every random state of a training process, as plain data, so a resumed run draws exactly what an
unbroken one would: Python's, NumPy's, torch's CPU and CUDA generators and the rank's own training
generator."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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

    After a change of world size (allowed only at an epoch end) the ranks keep their fresh seeds
    instead: the run goes on, but no longer bitwise as before.
    """
    if len(states) != world_size:
        if rank == 0:
            print(
                f"note: world size changed from {len(states)} to {world_size}; the ranks' random streams start afresh",
                file=sys.stderr,
            )
        return
    state = states[rank]
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], generator.device)
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], np.array(numpy["key"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )


def gather_rng(generator: torch.Generator, world_size: int) -> list[dict[str, Any]]:
    """Every rank's random states, in rank order (a collective: every rank must call it)."""
    states = [capture_rng(generator)]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, capture_rng(generator))
    return states
