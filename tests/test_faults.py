"""Faults that come from people and from the machine, through the real command lines: a fresh run into
a used folder, two runs on one folder, a full or refusing disk, a folder that cannot be created.

Each test asserts the exit status, the one-line message, and that every file that was there before is
byte-identical afterwards. Full disks are real: small tmpfs mounts (root, as CI runs); where mounting
is impossible those tests skip, and the in-process tests below fake the failing writes instead.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

import runtime.files
from models.checkpoint import list_checkpoints, verify_checksums
from runtime.errors import EXIT_RESUMABLE, EXIT_USER_ERROR
from tests.helpers import (
    MICRO,
    TOTAL_STEPS,
    finish,
    run_in_process,
    start_training,
    state_bytes,
    wait_for,
    write_untrained_checkpoint,
)
from training.run_folder import LOCK_NAME


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_steps(out: Path) -> list[int]:
    """The steps of the loss lines in ``out``'s metrics.jsonl, in the order they were written."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def train(out: Path, *extra: str) -> tuple[int, str]:
    """train.py on the micro config in this process: (exit status, stderr)."""
    return run_in_process("train.py", [*MICRO, "--output_dir", str(out), *extra], {}, out.parent)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished micro run of seed 2, to be protected from the runs that follow."""
    out = tmp_path_factory.mktemp("finished") / "run"
    status, stderr = train(out, "--seed", "2")
    assert status == 0, stderr[-2000:]
    return out


# ----------------------------------------------------------------------------- a fresh run into a used folder
def test_a_fresh_run_into_a_used_folder_is_refused_naming_what_it_holds(finished_run):
    before = files_of(finished_run)
    status, stderr = train(finished_run, "--seed", "3", "--num_epochs", "1")
    assert status == EXIT_USER_ERROR
    line = one_error_line(stderr)
    assert f"--output_dir {finished_run} already holds a training run" in line
    assert f"checkpoint_epoch_0002.pt: epoch 2, step {TOTAL_STEPS}, seed 2" in line
    assert "--resume" in line and "--overwrite" in line and "another --output_dir" in line
    assert files_of(finished_run) == before


def test_overwrite_moves_the_old_run_aside_as_a_whole(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = files_of(out)
    status, _ = train(out, "--seed", "3", "--num_epochs", "1", "--overwrite")
    assert status == 0
    (aside,) = out.glob("replaced_*")
    assert {f"{aside.name}/{name}": data for name, data in before.items() if name != LOCK_NAME} == {
        name: data for name, data in files_of(out).items() if name.startswith(aside.name)
    }
    assert [c.path.name for c in list_checkpoints(out)] == [
        "checkpoint_step_00000003.pt",
        "checkpoint_step_00000006.pt",
        "checkpoint_epoch_0001.pt",
    ]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # this run's lines only
    assert len([r for r in records if "epoch_loss" in r]) == 1


def test_overwrite_and_resume_together_are_refused():
    status, stderr = run_in_process("train.py", [*MICRO, "--overwrite", "--resume"], {}, Path.cwd())
    assert status == EXIT_USER_ERROR and "give only one of them" in one_error_line(stderr)


# ----------------------------------------------------------------------------- two runs on one folder
@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = start_training(out, "--num_epochs", "20")  # long enough to be running while the second one starts
    lock = out / LOCK_NAME
    wait_for(lambda: lock.is_file() and lock.stat().st_size > 0, first, "the first run to claim its folder")
    holder = lock.read_bytes()
    status, stderr = train(out, "--resume", "auto")  # SLURM's double submission: same folder, --resume auto
    line = one_error_line(stderr)
    assert status == EXIT_USER_ERROR and first.poll() is None
    host = json.loads(holder)["host"]
    assert f"is in use by another training run (host {host}, pid {first.pid}, started " in line
    assert lock.read_bytes() == holder  # the refused run wrote nothing, not even its name
    wait_for(lambda: len(logged_steps(out)) >= 2, first, "the first run's second step")
    first.send_signal(signal.SIGTERM)  # it has shown what it must; stop it rather than wait for 20 epochs
    finish(first, EXIT_RESUMABLE)
    steps = logged_steps(out)
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))  # one run's lines, each step once


@pytest.mark.slow
def test_a_killed_run_leaves_no_lock_that_blocks_resuming(tmp_path):
    out = tmp_path / "run"
    first = start_training(out)
    wait_for(lambda: list_checkpoints(out), first, "a checkpoint")
    first.kill()
    first.wait()
    status, stderr = train(out, "--resume")
    assert status == 0, stderr[-2000:]
    assert list_checkpoints(out)[-1].step == TOTAL_STEPS


# ----------------------------------------------------------------------------- folders that cannot be written
@pytest.mark.parametrize(
    "script,args",
    [
        ("train.py", ("--output_dir", "/proc/forbidden/out")),
        ("sample.py", ("--prompt", "7", "--out", "/proc/forbidden/out/7.png")),
    ],
)
def test_a_folder_under_proc_is_refused_before_any_work(script, args, tmp_path):
    status, stderr = run_in_process(script, [*MICRO, *args] if script == "train.py" else list(args), {}, tmp_path)
    assert status == EXIT_USER_ERROR
    assert "/proc/forbidden/out is not writable (No such file or directory); pick a writable folder" in one_error_line(
        stderr
    )


# ----------------------------------------------------------------------------- real small file systems
@pytest.fixture
def mount(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs of that size; unmounted afterwards."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not root'})")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_exit_75_and_resumes_bitwise(mount, tmp_path):
    # Each micro checkpoint is about 1.7 MB: the third one (step 8, the end of epoch 1) does not fit in 4 MiB.
    out = mount("4m") / "run"
    status, stderr = train(out)
    line = one_error_line(stderr)
    assert status == EXIT_RESUMABLE
    assert f"error: no space left writing {out}/checkpoints/checkpoint_epoch_0001.pt: it needed 1." in line
    assert f"the last good checkpoint is {out}/checkpoints/checkpoint_step_00000006.pt; free some space" in line
    assert [c.step for c in list_checkpoints(out)] == [3, 6]
    for c in list_checkpoints(out):
        verify_checksums(c.path)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # nothing half-written

    remount(out.parent, "size=64m")  # space freed
    status, stderr = train(out, "--resume")
    assert status == 0, stderr[-2000:]
    straight = tmp_path / "straight"
    assert train(straight)[0] == 0
    a, b = (torch.load(o / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True) for o in (straight, out))
    for part in ("model", "ema", "optimizer"):
        assert state_bytes(a[part]) == state_bytes(b[part]), f"{part} differs after the full disk"


def test_a_full_disk_for_the_evaluation_json_keeps_the_checkpoint(mount):
    checkpoint = write_untrained_checkpoint(mount("64m") / "c.pt")
    folder = mount(f"{checkpoint.stat().st_size // 1024 + 256}k")
    shutil.copy(checkpoint, folder / "checkpoint_epoch_0001.pt")
    (folder / "filler").write_bytes(b"\0" * (shutil.disk_usage(folder).free - 100))
    before = files_of(folder)
    args = ["--checkpoint", str(folder / "checkpoint_epoch_0001.pt"), "--num_samples", "1", "--steps", "1"]
    args += ["--style_samples", "1"]  # the style picture is still due, after the JSON
    status, stderr = run_in_process("evaluate.py", args, {}, folder.parent)
    line = one_error_line(stderr)
    assert status == EXIT_RESUMABLE and "no space left writing" in line and "_eval_" in line and ".json" in line
    assert files_of(folder) == before


def test_a_read_only_folder_is_refused_for_every_command(mount, checkpoint):
    folder = mount("1m", read_only=True)
    for script, args in [
        ("train.py", [*MICRO, "--output_dir", str(folder / "run")]),
        ("sample.py", ["--prompt", "7", "--checkpoint", str(checkpoint), "--out", str(folder / "7.png")]),
    ]:
        status, stderr = run_in_process(script, args, {}, folder.parent)
        assert status == EXIT_USER_ERROR
        assert "is not writable (Read-only file system)" in one_error_line(stderr)
    assert not any(folder.iterdir())


# ----------------------------------------------------------------------------- faked failing writes
def test_an_io_error_writing_a_sample_grid_is_one_line_exit_75(tmp_path, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("samples_epoch_0001.png"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(runtime.files.os, "replace", failing_replace)
    out = tmp_path / "run"
    status, stderr = train(out, "--num_epochs", "1")
    line = one_error_line(stderr)
    assert status == EXIT_RESUMABLE and f"I/O error writing {out}/samples/samples_epoch_0001.png" in line
    assert f"the last good checkpoint is {out}/checkpoints/checkpoint_epoch_0001.pt" in line
    assert not list(out.rglob("*.tmp"))


def test_a_quota_hit_appending_a_metrics_line_leaves_no_half_line(tmp_path, monkeypatch):
    real_open, calls = open, []

    class HalfWriter:
        """A file whose 5th write stores half its bytes and then fails as a full quota does."""

        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            calls.append(data)
            if len(calls) == 5:
                self.f.write(data[: len(data) // 2])
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            return self.f.write(data)

    monkeypatch.setattr(runtime.files, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)
    out = tmp_path / "run"
    status, stderr = train(out)
    assert status == EXIT_RESUMABLE
    assert f"disk quota exceeded writing {out}/metrics.jsonl: it needed" in one_error_line(stderr)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["step"] == i for i, line in enumerate(lines, 1))
