"""The output folder of a training run: ``checkpoints/``, ``samples/`` and ``metrics.jsonl``, owned by
one run at a time.

A run claims its folder before any heavy work (rank 0 only, under DDP):

- the folder is created, or proved writable with a probe file, and removed again if the run is
  then refused for any reason before it starts;
- a lock (``.train.lock``, an ``flock`` the OS releases when the process dies, so a SIGKILL or a
  crashed node never leaves a stale lock) keeps a second run out: it fails at once, naming the
  holder's host, pid and start time;
- a fresh run (no ``--resume``) is refused in a folder that holds another run's files, naming what
  they hold; ``--overwrite`` moves them aside, as a whole, into ``replaced_<time>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import checkpoint_dir, list_checkpoints
from runtime.errors import UserError
from runtime.files import append_line, atomic_write, prove_writable, remove_created

LOCK_NAME = ".train.lock"
RUN_FILES = ("checkpoints", "samples", "metrics.jsonl")  # what --overwrite moves aside, together


class RunFolder:
    """Where one run writes. Only rank 0 (``master``) claims, writes or moves anything."""

    def __init__(self, path: str | Path, master: bool):
        self.path, self.master = Path(path), master
        self.metrics = self.path / "metrics.jsonl"
        self._lock_fd: int | None = None
        self._started = False  # start() has run: from then on nothing is removed
        self._replace: tuple[str, list[Path]] | None = None  # an earlier run that --overwrite moves aside

    # ------------------------------------------------------------------ claiming
    @contextlib.contextmanager
    def claimed(self, fresh: bool, overwrite: bool) -> Iterator[RunFolder]:
        """Hold the folder for the body (the whole run). ``fresh``: no ``--resume`` was given, so another
        run's files are refused, or moved aside by :meth:`start` with ``overwrite``. An exception before
        :meth:`start` removes the folders this claim created."""
        if not self.master:
            yield self
            return
        created = prove_writable(self.path, "--output_dir")
        new_lock = not (self.path / LOCK_NAME).exists()
        try:
            self._lock()
            if fresh:
                self._replace = self._earlier_run(overwrite)
            yield self
        except BaseException:
            if not self._started:
                self._unlock(remove=new_lock)  # a refused run leaves no trace
                remove_created(created)
            raise
        finally:
            self._unlock()

    def start(self, fresh_after_auto: bool) -> None:
        """Once every input has been checked: say who holds the folder, move an earlier run aside if
        ``--overwrite`` asked for it, and create samples/. ``fresh_after_auto``: ``--resume auto`` found no
        checkpoint, so the lines a failed earlier attempt logged are dropped."""
        if not self.master:
            return
        self._started = True
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, json.dumps(holder).encode(), 0)
        if self._replace is not None:
            self._move_aside(*self._replace)
        if fresh_after_auto:
            self.rewind_metrics(0)
        (self.path / "samples").mkdir(parents=True, exist_ok=True)

    def _lock(self) -> None:
        """Take the folder's lock, or raise UserError naming its holder. A lock file that was replaced
        while this process waited for it (a refused run removes the folder it created) is taken afresh."""
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise UserError(
                    f"--output_dir {self.path} is in use by another training run ({_describe_holder(holder)}); "
                    "wait for it to finish or stop it, or pick another --output_dir"
                ) from None
            if path.exists() and os.fstat(fd).st_ino == path.stat().st_ino:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self, remove: bool = False) -> None:
        if self._lock_fd is None:
            return
        if remove:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

    def _earlier_run(self, overwrite: bool) -> tuple[str, list[Path]] | None:
        """(what they hold, the paths) of another run's files here; refused without ``overwrite``."""
        present = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        held = self._describe_run()
        if held is None:
            return None
        if not overwrite:
            raise UserError(
                f"--output_dir {self.path} already holds a training run ({held}); continue it with "
                "--resume, start again with --overwrite (moves it aside), or pick another --output_dir"
            )
        return held, present

    def _describe_run(self) -> str | None:
        """What the earlier run's files hold: its newest checkpoint's position and seed, or its metrics."""
        found = list_checkpoints(self.path)
        if found:
            newest = found[-1]
            header = torch.load(newest.path, map_location="cpu", weights_only=True, mmap=True)
            return (
                f"{newest.path.name}: epoch {header['epoch']}, step {newest.step}, seed {header['config'].get('seed')}"
            )
        stray = sorted(checkpoint_dir(self.path).glob("checkpoint_*.pt"))
        if stray:
            return f"{len(stray)} unreadable checkpoint file(s) in {checkpoint_dir(self.path)}"
        if self.metrics.is_file() and self.metrics.stat().st_size:
            return f"{self.metrics.name} of a run that wrote no checkpoint"
        return None

    def _move_aside(self, held: str, paths: list[Path]) -> None:
        aside = self.path / f"replaced_{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in paths:
            path.rename(aside / path.name)
        print(f"--overwrite: moved the earlier run ({held}) to {aside}")

    # ------------------------------------------------------------------ writing
    def sample_grid(self, epoch: int) -> Path:
        return self.path / "samples" / f"samples_epoch_{epoch:04d}.png"

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (rank 0)."""
        if self.master:
            append_line(self.metrics, json.dumps(record))

    def rewind_metrics(self, step: int) -> None:
        """Drop the metrics records after ``step`` that a killed run logged: the resumed run logs them again."""
        if not self.master or not self.metrics.is_file():
            return
        lines = self.metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_by_step(line, step)]
        if len(kept) < len(lines):
            atomic_write(self.metrics, lambda f: f.write("".join(kept).encode()))


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said which"


def _logged_by_step(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:  # the last line of a run killed while appending it
        return False
