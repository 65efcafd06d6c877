"""Checkpoint files: written atomically, found by the step they hold, loaded as plain data only.

``<output_dir>/checkpoints/`` holds

- ``checkpoint_epoch_EEEE.pt``: the state at the end of epoch EEEE;
- ``checkpoint_step_SSSSSSSS.pt``: the state after global step SSSSSSSS, in the middle of an epoch
  (every ``checkpoint_every_steps`` steps, and when a signal stops training);
- ``.checkpoint_*.tmp``: a write in progress, or one a kill interrupted; never read, and deleted
  by the next ``prune_checkpoints``.

The newest checkpoint is the one whose *contents* hold the highest step, among the files whose
names match exactly, whose contents agree with their names and whose zip CRCs verify: a torn,
truncated, bit-flipped, renamed or foreign file is skipped with a warning, never picked.
"""

from __future__ import annotations

import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.errors import UserError
from runtime.files import atomic_write
from training.state import position, upgrade

EPOCH_NAME = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")
STEP_NAME = re.compile(r"^checkpoint_step_(\d+)\.pt$")
TEMP_GLOB = ".checkpoint_*.tmp"  # runtime.files.atomic_write's temporary names for checkpoint files


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    """Where the state at the end of ``epoch`` goes."""
    return checkpoint_dir(output_dir) / f"checkpoint_epoch_{epoch:04d}.pt"


def step_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where a mid-epoch state after global step ``step`` goes."""
    return checkpoint_dir(output_dir) / f"checkpoint_step_{step:08d}.pt"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def verify_checksums(path: Path) -> None:
    """Raise UserError unless ``path`` is a complete zip whose every member matches its CRC-32.

    ``torch.load`` reads a bit-flipped tensor without complaint; this reads the file once more
    (milliseconds for this project's checkpoints) so a damaged one is refused, not trained on.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(
            f"checkpoint {path} is truncated or not a checkpoint ({err}); delete it and use an earlier one"
        ) from None
    if damaged is not None:
        raise UserError(
            f"checkpoint {path} is corrupt (checksum mismatch in {damaged}); delete it and use an earlier one"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint after checking its CRCs, with ``weights_only=True`` (tensors and plain data, never
    code), in the current format whichever format it was written in (``training.state.upgrade``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path, or train first (python train.py)")
    verify_checksums(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a foreign file or a pickle that would run code
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}); delete it and use an earlier one"
        ) from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (missing config/ema/text_encoder)")
    return upgrade(payload, path)


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    step: int
    epoch_end: bool


def list_checkpoints(output_dir: str | Path) -> list[CheckpointFile]:
    """The checkpoints in ``output_dir`` whose contents agree with their names, oldest first by step.

    Reads each file's position fields only (a memory-mapped load: the tensors stay on disk);
    files that cannot be read or disagree with their names are skipped with a warning.
    """
    found = []
    for path in sorted(checkpoint_dir(output_dir).glob("checkpoint_*.pt")):
        epoch_name, step_name = EPOCH_NAME.match(path.name), STEP_NAME.match(path.name)
        if not (epoch_name or step_name):
            continue
        try:
            header = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step, epoch, batches_done, steps_per_epoch = position(header)
        except Exception:  # truncated, foreign or from an older train.py: not a candidate
            _warn(f"ignoring {path}: unreadable, or not a checkpoint this train.py wrote")
            continue
        if epoch_name and (epoch != int(epoch_name.group(1)) or batches_done != steps_per_epoch):
            _warn(
                f"ignoring {path}: it holds {batches_done}/{steps_per_epoch} steps of epoch {epoch}, "
                "not the end of the epoch its name says"
            )
        elif step_name and step != int(step_name.group(1)):
            _warn(f"ignoring {path}: it holds step {step}, not its name's")
        else:
            found.append(CheckpointFile(path, step, epoch_name is not None))
    return sorted(found, key=lambda c: (c.step, c.epoch_end))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The intact checkpoint holding the highest step in ``output_dir``, or None."""
    for candidate in reversed(list_checkpoints(output_dir)):
        try:
            verify_checksums(candidate.path)
        except UserError as err:
            _warn(f"skipping {err}")
            continue
        return candidate.path
    return None


def no_checkpoint_error(output_dir: str | Path) -> UserError:
    """What sample.py and evaluate.py say when ``output_dir`` holds no checkpoint to read."""
    checkpoints = Path(output_dir) / "checkpoints"
    return UserError(f"no checkpoint in {checkpoints}; train first (python train.py) or pass --checkpoint PATH")


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: None (start fresh), "latest", "auto" (latest if any) or a path."""
    if resume is None:
        return None
    if resume not in ("latest", "auto"):
        return Path(resume)
    path = latest_checkpoint(output_dir)
    if path is None and resume == "latest":
        raise UserError(
            f"--resume found no checkpoint in {checkpoint_dir(output_dir)}; "
            "drop --resume to start fresh, or pass --resume auto"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete leftover temporary files and, if ``keep_last`` > 0, all but the newest ``keep_last`` checkpoints.

    Call it only after the newest checkpoint is safely on disk; files that are not checkpoints
    (or disagree with their names) are never deleted.
    """
    for temp in checkpoint_dir(output_dir).glob(TEMP_GLOB):
        temp.unlink(missing_ok=True)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            old.path.unlink(missing_ok=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
