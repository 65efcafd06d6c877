"""Checkpoint files: written atomically, found by name, loaded as plain data only."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from errors import UserError
from fileio import atomic_write

CHECKPOINT_RE = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    return checkpoint_dir(output_dir) / f"checkpoint_epoch_{epoch:04d}.pt"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest epoch number in ``output_dir``, or None."""
    folder = checkpoint_dir(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_epoch_*.pt") if (m := CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (python train.py) or pass --checkpoint PATH")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a torn or foreign file
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}); "
                        "delete it and use an earlier one") from None
    if not isinstance(payload, dict) or not {"config", "ema", "text_encoder"} <= payload.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (missing config/ema/text_encoder)")
    return payload
