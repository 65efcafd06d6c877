"""Why training stops before its last step: a signal asking it to, or a loss gone non-finite."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.errors import EXIT_RESUMABLE, UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 become a request to checkpoint at the next step boundary and exit.

    SLURM sends SIGTERM (or the signal asked for with ``sbatch --signal``) before a time limit or
    a pre-emption; torchrun's agent forwards SIGTERM and SIGINT (and SIGUSR1 if it is listed in
    ``--signals_to_handle``) to every worker. Under DDP all ranks must stop after the same step,
    and a signal may reach only some of them, so every ``check_every`` steps the ranks agree with
    one all_reduce of a one-element flag: a host sync once per ``check_every`` steps. A single
    process reads its flag every step, for free. Repeated signals are ignored (the checkpoint is
    on its way); SIGKILL stops at once, and the newest checkpoint on disk stays intact.
    """

    def __init__(self, check_every: int, world_size: int, device: torch.device):
        self.check_every, self.world_size, self.device = check_every, world_size, device
        self.received: signal.Signals | None = None

    def install(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            # os.write, not print: a handler may interrupt a print that holds the stream's lock.
            os.write(
                2,
                f"\n{self.received.name}: checkpointing at the next step boundary, then exiting "
                f"with status {EXIT_RESUMABLE} (resume with --resume)\n".encode(),
            )

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received else "a signal on another rank"

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after ``step``; the same answer on every rank."""
        if self.world_size == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class NonFiniteGuard:
    """Stops training at the first step whose gradient norm is not finite, or skips up to ``max_bad_steps`` of them.

    A non-finite loss on any rank makes the all-reduced gradients, hence the norm, non-finite on
    every rank, so all ranks decide alike. Without skipping there is no per-step host sync: the
    first bad step is recorded on the device, and ``check`` (at log steps and before every
    checkpoint, so no checkpoint ever holds a NaN) raises. Skipping needs each step's verdict on
    the host: one sync per step, only when ``max_bad_steps`` > 0.
    """

    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps, self.skipped = max_bad_steps, 0  # skipped: restored from a checkpoint on resume
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.last_good: Path | None = None  # the newest checkpoint written, for the error message

    def admit(self, grad_norm: torch.Tensor, step: int) -> bool:
        """Whether the optimizer may apply the update of global step ``step`` (counted from 1)."""
        finite = torch.isfinite(grad_norm)
        if not self.max_bad_steps:
            self.first_bad = torch.where((self.first_bad == 0) & ~finite, step, self.first_bad)
            return True
        if finite.item():
            return True
        self.skipped += 1
        if self.skipped > self.max_bad_steps:
            self._fail(step, f"{self.skipped} such steps, more than --max_bad_steps {self.max_bad_steps}")
        print(
            f"warning: non-finite loss or gradients at step {step}: update skipped "
            f"({self.skipped} of --max_bad_steps {self.max_bad_steps})",
            file=sys.stderr,
        )
        return False

    def check(self) -> None:
        """Raise UserError if a step so far had a non-finite gradient norm (a host sync)."""
        first_bad = int(self.first_bad)
        if first_bad:
            self._fail(first_bad, "")

    def _fail(self, step: int, detail: str) -> None:
        restart = f"--resume {self.last_good} (the last good checkpoint)" if self.last_good else "a fresh run"
        raise UserError(
            f"loss or gradients became non-finite (NaN/inf) at step {step}{', ' + detail if detail else ''}; "
            f"stopped without saving; try {restart} with a lower --learning_rate or --grad_clip, "
            "or pass --max_bad_steps N to skip up to N such steps"
        )
