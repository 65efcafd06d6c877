"""The output folder of a training run: ``checkpoints/``, ``samples/`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.files import atomic_write, check_writable


class RunFolder:
    """Where one run writes. Only rank 0 (``master``) writes anything."""

    def __init__(self, path: str | Path, master: bool):
        self.path, self.master = Path(path), master
        self.metrics = self.path / "metrics.jsonl"

    def check_writable(self) -> None:
        """Before any heavy work: raise UserError unless the folder is, or can be made, writable."""
        if self.master:
            check_writable(self.path, "--output_dir")

    def prepare(self) -> None:
        """Create the folder and its samples/ (rank 0), once every input has been checked."""
        if self.master:
            (self.path / "samples").mkdir(parents=True, exist_ok=True)

    def sample_grid(self, epoch: int) -> Path:
        return self.path / "samples" / f"samples_epoch_{epoch:04d}.png"

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (rank 0)."""
        if self.master:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind_metrics(self, step: int) -> None:
        """Drop the metrics records after ``step`` that a killed run logged: the resumed run logs them again."""
        if not self.master or not self.metrics.is_file():
            return
        lines = self.metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_by_step(line, step)]
        if len(kept) < len(lines):
            atomic_write(self.metrics, lambda f: f.write("".join(kept).encode()))


def _logged_by_step(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:  # the last line of a run killed while appending it
        return False
