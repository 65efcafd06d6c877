"""Kill, stop and resume train.py for real, and compare bitwise with a run that never stopped.

One run goes straight through. A second is SIGKILLed just after its first mid-epoch checkpoint,
resumed with --resume, sent SIGTERM (it must write a checkpoint and exit with EXIT_RESUMABLE),
and resumed again to the end (in the test's own process: that part needs no signal). Both end with
bitwise the same model, EMA and optimizer state, and the same logged losses. Then the checkpoint
discovery is fed torn, bit-flipped, renamed and foreign files, and the guard rails are run on a
learning rate that blows up.
"""

import io
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from models.checkpoint import latest_checkpoint, list_checkpoints, step_checkpoint_path
from runtime.errors import EXIT_RESUMABLE, EXIT_USER_ERROR
from tests.helpers import MICRO, ROOT, TOTAL_STEPS, finish, run_in_process, start_training, state_bytes, wait_for
from training.checkpoints import prune_checkpoints
from training.stopping import NonFiniteGuard


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def resumed_step(log: str) -> int:
    """The step in train.py's "resumed from PATH at step S: ..." line."""
    line = next(line for line in log.splitlines() if line.startswith("resumed from"))
    return int(line.split(" at step ")[1].split(":")[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted output dir, interrupted output dir, the steps the two resumptions started from)."""
    straight, broken = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("broken")
    reference = start_training(straight)  # runs alongside the interrupted lineage
    first = start_training(broken)
    wait_for(lambda: list((broken / "checkpoints").glob("checkpoint_step_*.pt")), first, "a step checkpoint")
    first.send_signal(signal.SIGKILL)
    finish(first, -signal.SIGKILL)

    second = start_training(broken, "--resume")
    first_resume = resumed_step(next(line for line in second.stdout if line.startswith("resumed from")))
    wait_for(lambda: logged_steps(broken) > first_resume, second, "a step after resuming")
    second.send_signal(signal.SIGTERM)
    assert "stopped by SIGTERM after step" in finish(second, EXIT_RESUMABLE)

    printed = io.StringIO()  # the last resumption needs no signal: it runs in this process, to the end
    status, stderr = run_in_process("train.py", [*MICRO, "--output_dir", str(broken), "--resume"], {}, ROOT, printed)
    assert status == 0, stderr[-3000:]
    second_resume = resumed_step(printed.getvalue() + stderr)
    finish(reference, 0)
    return straight, broken, (first_resume, second_resume)


@pytest.mark.slow
def test_killed_and_stopped_run_ends_bitwise_identical(runs):
    straight, broken, resumed_at = runs
    first, second = resumed_at
    assert 0 < first < second < TOTAL_STEPS  # the kill lost steps that were redone; the stop saved where it stopped
    assert first % 8 != 0  # the kill came mid-epoch, so the first resume started mid-epoch
    a = torch.load(straight / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True)
    assert a["step"] == b["step"] == TOTAL_STEPS
    for part in ("model", "ema", "optimizer"):
        expected, got = state_bytes(a[part]), state_bytes(b[part])
        assert expected.keys() == got.keys() and expected == got, f"{part} differs after kill + resume"
    assert a["ema"]["updates"] == b["ema"]["updates"] == TOTAL_STEPS


@pytest.mark.slow
def test_resumed_run_logs_each_step_once_with_the_same_losses(runs):
    straight, broken, _ = runs

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
        return steps, [(r["step"], r["epoch_loss"]) for r in records if "epoch_loss" in r], records

    (expected, expected_epochs, _), (got, got_epochs, records) = losses(straight), losses(broken)
    assert [s for s, _, _ in expected] == list(range(1, TOTAL_STEPS + 1))
    assert got == expected and got_epochs == expected_epochs and len(got_epochs) == 2
    stops = [r for r in records if r.get("event") == "stopped"]
    assert len(stops) == 1 and stops[0]["signal"] == "SIGTERM" and Path(stops[0]["checkpoint"]).is_file()


@pytest.mark.slow
def test_latest_checkpoint_is_never_fooled(runs, tmp_path):
    _, broken, _ = runs
    shutil.copytree(broken / "checkpoints", tmp_path / "checkpoints")
    folder = tmp_path / "checkpoints"
    newest = latest_checkpoint(tmp_path)
    assert newest == folder / "checkpoint_epoch_0002.pt"
    data = newest.read_bytes()
    (folder / ".checkpoint_step_00000099.pt.x1y2.tmp").write_bytes(data[: len(data) // 2])  # a write a kill cut
    (folder / "checkpoint_step_00000098.pt").write_bytes(data[: len(data) // 2])  # torn (an older, non-atomic copy)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # one bit-flipped byte: torch.load alone would accept it
    (folder / "checkpoint_step_00000016.pt").write_bytes(bytes(flipped))
    shutil.copy(folder / "checkpoint_epoch_0001.pt", folder / "checkpoint_step_00000097.pt")  # renamed: holds step 8
    torch.save({"step": 96, "weights": torch.zeros(3)}, folder / "checkpoint_step_00000096.pt")  # foreign
    assert latest_checkpoint(tmp_path) == newest
    newest.unlink()
    assert latest_checkpoint(tmp_path) == step_checkpoint_path(tmp_path, 15)  # the bit-flipped "16" is skipped


@pytest.mark.slow
def test_prune_keeps_the_newest_and_spares_what_is_not_a_checkpoint(runs, tmp_path):
    _, broken, _ = runs
    shutil.copytree(broken / "checkpoints", tmp_path / "checkpoints")
    folder = tmp_path / "checkpoints"
    (folder / ".checkpoint_step_00000099.pt.x1y2.tmp").write_bytes(b"torn")
    (folder / "checkpoint_step_00000098.pt").write_bytes(b"not a checkpoint")
    before = [c.step for c in list_checkpoints(tmp_path)]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == before[-2:] == [15, 16]
    assert (folder / "checkpoint_step_00000098.pt").is_file()
    assert not list(folder.glob(".*.tmp"))
    assert step_checkpoint_path(tmp_path, 15).is_file()


def train_until_error(out: Path, *extra: str) -> str:
    """Train in this process (see tests/cli.py) where train.py must stop with exit status 2; its stderr."""
    status, stderr = run_in_process("train.py", [*MICRO, "--output_dir", str(out), *extra], {}, out.parent)
    assert status == EXIT_USER_ERROR and "Traceback" not in stderr, stderr[-3000:]
    return stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Adam's first update moves every weight by about the learning rate: 1e30 overflows step 2's forward pass.
    out = tmp_path / "run"
    log = train_until_error(out, "--learning_rate", "1e30", "--checkpoint_every_steps", "1")
    assert "error: loss or gradients became non-finite (NaN/inf) at step 2;" in log
    assert [c.step for c in list_checkpoints(out)] == [1]
    assert f"--resume {step_checkpoint_path(out, 1)}" in log
    state = torch.load(step_checkpoint_path(out, 1), weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_max_bad_steps_skips_a_bounded_number_of_updates(tmp_path):
    out = tmp_path / "run"
    log = train_until_error(out, "--learning_rate", "1e30", "--checkpoint_every_steps", "1", "--max_bad_steps", "2")
    assert "step 2: update skipped (1 of --max_bad_steps 2)" in log
    assert "step 3: update skipped (2 of --max_bad_steps 2)" in log
    assert "non-finite (NaN/inf) at step 4, 3 such steps, more than --max_bad_steps 2" in log
    # Skipped steps leave the weights finite, so the checkpoints after them are written and resumable.
    assert [c.step for c in list_checkpoints(out)] == [1, 2, 3]
    state = torch.load(step_checkpoint_path(out, 3), weights_only=True)
    assert state["bad_steps"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_guard_skips_exactly_the_non_finite_steps():
    guard = NonFiniteGuard(max_bad_steps=2, device=torch.device("cpu"))
    norms = [1.0, float("nan"), 3.0, float("inf"), 0.5]
    admitted = [guard.admit(torch.tensor(n), step) for step, n in enumerate(norms, start=11)]
    assert admitted == [True, False, True, False, True] and guard.skipped == 2
    guard.check()  # skipping mode never fails a check


def test_guard_without_skipping_records_the_first_bad_step_without_a_sync():
    guard = NonFiniteGuard(max_bad_steps=0, device=torch.device("cpu"))
    norms = [1.0, 2.0, float("nan"), float("nan"), 1.0]
    assert all(guard.admit(torch.tensor(n), step) for step, n in enumerate(norms, start=1))
    with pytest.raises(Exception, match="at step 3;"):
        guard.check()


def test_every_torch_load_in_the_product_is_weights_only():
    """Checkpoints and weight files are data: no torch.load in the product may unpickle code."""
    product = [
        p
        for p in ROOT.rglob("*.py")
        if not {"tests", "bench"} & set(p.relative_to(ROOT).parts) and not p.relative_to(ROOT).parts[0].startswith(".")
    ]
    calls = [(p, line) for p in product for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls, "expected the checkpoint loader among the calls"
    unsafe = [f"{p.relative_to(ROOT)}: {line.strip()}" for p, line in calls if "weights_only=True" not in line]
    assert not unsafe, unsafe
