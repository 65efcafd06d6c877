"""Crash-safe file writing, shared by the data cache, checkpoints and images."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from runtime.errors import UserError


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    A crash at any moment leaves either the old file or the complete new one, never a torn one;
    the temporary name (``.NAME.XXXX.tmp``) never matches the patterns readers look for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide caches and outputs from other users
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_writable(folder: Path, flag: str) -> None:
    """Raise UserError unless ``folder`` is, or could be created as, a writable folder; creates nothing.

    Run before any heavy work, so that a bad output path costs seconds, not a training run.
    """
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {existing} is a file; pick another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable ({existing} is read-only to you); pick a writable folder")
