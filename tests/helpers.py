"""Helpers the tests share: the repository root, an untrained checkpoint, and a command-line script
run inside the test process exactly as ``python SCRIPT ARGS`` would run it.

runpy executes the script with ``__name__ == "__main__"`` (its whole path, from argument parsing
to ``runtime.errors.run_cli``) under the given argv, environment and working folder, without paying the
~4 s of imports a subprocess costs here. Everything the script may change globally (argv, the
environment, the working folder, torch's thread count, the stop-signal handlers) is restored.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import save_checkpoint
from models.text_encoder import build_text_encoder
from training.config import TrainConfig
from training.state import TrainingState
from training.stopping import STOP_SIGNALS

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def tiny_flags(**values) -> tuple[str, ...]:
    """train.py flags: configs/tiny.yaml, overridden by ``values`` (a list value gives several words)."""
    flags = ["--config", str(TINY_CONFIG)]
    for key, value in values.items():
        flags += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return tuple(flags)


def write_untrained_checkpoint(path: Path, **overrides) -> Path:
    """An untrained tiny UNet (widths 16, 32) saved as train.py saves the end of epoch 1: its samples are noise."""
    cfg = TrainConfig.from_flat(
        {
            "widths": [16, 32],
            "attention": [False, True],
            "layers_per_block": 1,
            "head_dim": 16,
            "text_encoder": "random",
            "captions": "styles",  # as configs/tiny.yaml
            **overrides,
        }
    )
    state = TrainingState(
        cfg,
        torch.device("cpu"),
        rank=0,
        world_size=1,
        steps_per_epoch=1,
        text_encoder=build_text_encoder("random", seed=cfg.text_encoder_seed).record,
    )
    state.epoch_step = 1
    save_checkpoint(state.state_dict(), path)
    return path


@contextlib.contextmanager
def script_context(argv: list[str], env: dict[str, str], cwd: Path):
    """sys.argv, os.environ, the working folder, one torch thread and the stop-signal handlers, restored after."""
    saved = (
        sys.argv,
        dict(os.environ),
        Path.cwd(),
        torch.get_num_threads(),
        {s: signal.getsignal(s) for s in STOP_SIGNALS},
    )
    sys.argv = argv
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        sys.argv, environ, cwd_before, threads, handlers = saved
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd_before)
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_in_process(
    script: str, args: list[str], env: dict[str, str], cwd: Path, stdout: io.StringIO | None = None
) -> tuple[int, str]:
    """(exit status, stderr) of ``python script args``, run in this process; its stdout goes to ``stdout``."""
    stderr = io.StringIO()
    with (
        script_context([script, *args], {**ENV, **env}, cwd),
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(io.StringIO() if stdout is None else stdout),
    ):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            status = 0
        except SystemExit as exit_:
            status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return status, stderr.getvalue()


# configs/tiny.yaml made smaller: 8 steps per epoch of 16 images, 2 epochs, a mid-epoch checkpoint every 3 steps.
MICRO = tiny_flags(
    widths=[8, 16],
    head_dim=8,
    train_subset=128,
    batch_size=16,
    log_every=1,
    samples_per_digit=1,
    sample_steps=2,
    checkpoint_every_steps=3,
    device="cpu",
)
TOTAL_STEPS = 16
# One thread: the runs are bitwise reproducible at any fixed thread count, and much faster on a busy machine.
PROCESS_ENV = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}


# configs/tiny.yaml with the judge's evaluation at the end of each epoch: the run the tests of training's outputs,
# sampling, evaluation and the recipe's determinism share (tests/conftest.py's tiny_run).
TINY_RUN = ("train.py", "--config", str(TINY_CONFIG), "--eval_every", "1", "--eval_samples", "2")


def train_tiny(out: Path) -> Path:
    """TINY_RUN as a real process into ``out`` (16 steps of 64 images, 2 epochs); ``out``."""
    cmd = [sys.executable, *TINY_RUN, "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *MICRO, "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=PROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expected: int) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == expected, (
        f"exit {proc.returncode}, expected {expected}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    )
    return stdout + stderr


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}:\n{proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def state_bytes(state) -> dict:
    """Every leaf of a nested state as bytes: tensors raw, so equality is bitwise (NaN and -0.0 included)."""
    if isinstance(state, torch.Tensor):
        return {"": state.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()}
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        return {f"{k}/{path}": b for k, v in items for path, b in state_bytes(v).items()}
    return {"": repr(state).encode()}
