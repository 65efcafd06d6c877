"""Crash-safe files, shared by the data cache, checkpoints, images, metrics and reports.

- :func:`atomic_write` never leaves a torn file: a kill leaves the old file or the complete new one.
- A full disk (ENOSPC, EDQUOT) or an I/O error while writing is a :class:`StorageError` naming the
  file, the bytes it needed and those free, with nothing half-written left behind.
- :func:`writable_folder` proves an output folder writable by creating it and a probe file in it
  (``os.access`` is not the truth about a file system: a read-only mount or /proc says yes to
  root), and removes what it created if the command then fails.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from runtime.errors import StorageError, UserError

STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error"}


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write what ``write(file)`` writes to ``path``: first into memory (so its size is known), then to a
    temporary file beside ``path``, fsynced and renamed into place.

    A crash at any moment leaves either the old file or the complete new one, never a torn one;
    the temporary name (``.NAME.XXXX.tmp``) never matches the patterns readers look for.
    """
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    with storage_errors(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide caches and outputs from other users
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``; a failed append is cut off again, never left half-written."""
    data = (line + "\n").encode()
    with storage_errors(path, len(data)), open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
        except OSError:
            f.truncate(start)
            raise


@contextlib.contextmanager
def storage_errors(path: Path, needed: int) -> Iterator[None]:
    """Turn a full disk or an I/O error while writing ``needed`` bytes to ``path`` into a StorageError."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        raise StorageError(
            f"{STORAGE_ERRNOS[err.errno]} writing {path}: it needed {_size(needed)}, "
            f"{_size(_free_bytes(path))} free there"
        ) from None


def _free_bytes(path: Path) -> int:
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- output folders
def prove_writable(folder: Path, flag: str) -> list[Path]:
    """Create ``folder`` (and missing parents) and a probe file in it; the folders created, deepest first.

    Raises UserError, having removed what it created, when the file system refuses.
    """
    folder = Path(folder).absolute()
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"{flag} {folder} cannot be created: {existing} is a file; pick another folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        remove_created(created)
        raise UserError(f"{flag} {folder} is not writable ({err.strerror}); pick a writable folder") from None
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the folders ``prove_writable`` created, deepest first, each only while it is empty."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def writable_folder(folder: Path, flag: str) -> Iterator[Path]:
    """Prove ``folder`` writable before any heavy work; if the body then raises, the folders this created
    are removed again (while still empty), so a refused command leaves nothing behind."""
    created = prove_writable(folder, flag)
    try:
        yield Path(folder)
    except BaseException:
        remove_created(created)
        raise
