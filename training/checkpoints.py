"""What training alone does with checkpoint files: choose the one ``--resume`` continues, and prune old
ones. The format, the file names, the writer and the reader live in models/checkpoint.py."""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints
from runtime.errors import UserError

TEMP_GLOB = ".checkpoint_*.tmp"  # runtime.files.atomic_write's temporary names for checkpoint files


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
