"""Bad input through the real command lines: one line naming the problem and the fix, exit status 2,
no traceback, and nothing written.

Every case in CASES runs in this process exactly as ``python SCRIPT ARGS`` would run it (runpy
with ``__name__ == "__main__"``, the case's argv, environment and a fresh working folder): the
script's whole path from argument parsing to ``errors.run_cli``, without paying ~4 s of imports
per case. One case per script, marked ``process=True``, also runs as a real subprocess (all at once),
to check what a shell sees. "Nothing written" is checked by comparing every file under the test's folder
(outputs, checkpoints, data) before and after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from data.mnist import IDX_FILES, mnist_cache_dir
from models.checkpoint import save_checkpoint
from runtime.errors import EXIT_USER_ERROR
from tests.helpers import ENV, ROOT, run_in_process, tiny_flags

TINY = str(ROOT / "configs" / "tiny.yaml")
# configs/tiny.yaml shrunk to two steps of 16 images, with a checkpoint after each (so one is mid-epoch).
MICRO = tiny_flags(
    widths=[8, 16],
    head_dim=8,
    train_subset=32,
    batch_size=16,
    num_epochs=1,
    samples_per_digit=1,
    sample_steps=2,
    checkpoint_every_steps=1,
    device="cpu",
)
LONG_PROMPT = "a thick wide handwritten 7 slanted left"  # 10 CLIP tokens ("slanted" is two), all words trained


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple[str, ...]  # "{name}" is replaced by the path of the input fixture's file of that name
    message: str  # a regex the one error line must match
    env: dict[str, str] = field(default_factory=dict)
    process: bool = False  # also run as a real subprocess
    needs_no_cuda: bool = False


CASES = [
    # ---- train.py: flags and config values
    Case(
        "train-mistyped-flag",
        "train.py",
        ("--learning_rat", "1e-3"),
        r"unrecognized arguments: --learning_rat 1e-3; did you mean '--learning_rate'\?",
        process=True,
    ),
    Case(
        "train-mistyped-config-key",
        "train.py",
        ("--config", "{typo.yaml}"),
        r"unknown key 'batchsize' in .*typo\.yaml; did you mean 'batch_size'\?",
    ),
    Case(
        "train-missing-config",
        "train.py",
        ("--config", "{missing.yaml}"),
        r"config file .*missing\.yaml not found; pass an existing file to --config",
    ),
    Case(
        "train-invalid-yaml",
        "train.py",
        ("--config", "{invalid.yaml}"),
        r"config file .*invalid\.yaml is not valid YAML",
    ),
    Case("train-not-a-number", "train.py", ("--num_epochs", "two"), r"argument --num_epochs: invalid int value: 'two'"),
    Case(
        "train-negative-learning-rate",
        "train.py",
        ("--learning_rate", "-0.001"),
        r"--learning_rate must be > 0, got -0\.001",
    ),
    Case("train-zero-noise-spread", "train.py", ("--log_sigma_std", "0"), r"--log_sigma_std must be > 0, got 0\.0"),
    Case(
        "train-uniform-share-over-one", "train.py", ("--uniform_share", "1.5"), r"--uniform_share must be in \[0, 1\]"
    ),
    Case("train-zero-batch-size", "train.py", ("--batch_size", "0"), r"--batch_size must be at least 1, got 0"),
    Case("train-nan-grad-clip", "train.py", ("--grad_clip", "nan"), r"--grad_clip must be >= 0, got nan"),
    Case(
        "train-sample-steps-over-timesteps",
        "train.py",
        ("--sample_steps", "1001"),
        r"--sample_steps 1001 exceeds the model's 1000 training timesteps; use at most 1000",
    ),
    Case("train-unknown-choice", "train.py", ("--prediction", "x0"), r"--prediction must be one of eps, v, got 'x0'"),
    Case(
        "train-patches-do-not-halve",
        "train.py",
        ("--patch_size", "2"),
        r"--patch_size 2 with 3 --widths levels: .* use patch_size 1 with up to 3 levels, 2 with up to 2",
    ),
    Case(
        "train-world-size-splits-no-batch",
        "train.py",
        ("--global_batch_size", "64"),
        r"--global_batch_size 64 does not split evenly over world size 3; use a multiple of 3",
        env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
    ),
    Case(
        "train-cuda-absent",
        "train.py",
        ("--device", "cuda"),
        r"--device cuda asked for CUDA but none is available; use --device cpu",
        needs_no_cuda=True,
    ),
    Case(
        "train-output-dir-under-a-file",
        "train.py",
        (*MICRO, "--output_dir", "{a_file}/run"),
        r"--output_dir .*a_file/run cannot be created: .*a_file is a file; pick another folder",
    ),
    # ---- train.py: data
    Case(
        "train-data-dir-missing-files",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--data_dir", "{empty_dir}"),
        r"MNIST file train-images-idx3-ubyte \(or train-images-idx3-ubyte\.gz\) not found in .*; put the four "
        r"MNIST idx files there",
    ),
    Case(
        "train-data-file-corrupt",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--data_dir", "{corrupt_mnist}"),
        r"MNIST file .*train-labels-idx1-ubyte has md5 [0-9a-f]{32}, expected a25bea736e30d166cdddb491f175f624",
    ),
    # ---- train.py: resuming
    Case(
        "train-resume-finds-nothing",
        "train.py",
        (*MICRO, "--output_dir", "{empty_dir}", "--resume"),
        r"--resume found no checkpoint in .*; drop --resume to start fresh",
    ),
    Case(
        "train-resume-missing-file",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--resume", "{missing.pt}"),
        r"checkpoint .*missing\.pt does not exist; check the path",
    ),
    Case(
        "train-resume-truncated",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--resume", "{truncated.pt}"),
        r"checkpoint .*truncated\.pt is truncated or not a checkpoint .*; delete it and use an earlier one",
    ),
    Case(
        "train-resume-bit-flipped",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--resume", "{flipped.pt}"),
        r"checkpoint .*flipped\.pt is corrupt \(checksum mismatch in .*\); delete it and use an earlier one",
    ),
    Case(
        "train-resume-pickle-that-runs-code",
        "train.py",
        (*MICRO, "--output_dir", "{new}", "--resume", "{code.pt}"),
        r"checkpoint .*code\.pt is corrupt or not a checkpoint \(UnpicklingError\)",
    ),
    Case(
        "train-resume-other-architecture",
        "train.py",
        ("--config", TINY, "--output_dir", "{new}", "--resume", "{run}"),
        r"was written with widths=\[8, 16\] but this run has widths=\[16, 32\]; resume with the config it was trained "
        r"with",
    ),
    Case(
        "train-resume-other-patch-size",
        "train.py",
        (*MICRO, "--patch_size", "2", "--output_dir", "{new}", "--resume", "{run}"),
        r"was written with patch_size=1 but this run has patch_size=2; resume with the config it was trained with",
    ),
    Case(
        "train-resume-other-text-encoder",
        "train.py",
        (*MICRO, "--text_encoder_seed", "1", "--output_dir", "{new}", "--resume", "{run}"),
        r"checkpoint was trained with text encoder 'random' \(seed=0\) but 'random' \(seed=1\) is loaded now; "
        r"rerun with --text_encoder random with seed=0",
    ),
    Case(
        "train-resume-mid-epoch-other-batch",
        "train.py",
        (*MICRO, "--batch_size", "8", "--output_dir", "{new}", "--resume", "{mid_epoch}"),
        r"was written with batch_size=16 but this run has batch_size=8; resume with the same values \(they fix the "
        r"data order within an epoch\), or an epoch-end checkpoint",
    ),
    # ---- sample.py
    Case(
        "sample-empty-prompt",
        "sample.py",
        ("--prompt", "  "),
        r"--prompt is empty; give the digit to draw",
        process=True,
    ),
    Case(
        "sample-two-digits",
        "sample.py",
        ("--prompt", "7", "--prompt", "3 or 8"),
        r"prompt '3 or 8' names 2 different digits \(3, 8\), and an image is one digit: give each a prompt of its "
        r"own, e\.g\. --prompt '3'",
    ),
    Case(
        "sample-over-long-prompt",
        "sample.py",
        ("--prompt", LONG_PROMPT, "--checkpoint", "{run}"),
        r"prompt 'a thick wide handwritten 7 slanted left' is longer than the text encoder's 8 tokens and would be "
        r"truncated to 'a thick wide handwritten 7 slan'; shorten it, or pass --allow_truncation",
    ),
    Case(
        "sample-negative-guidance",
        "sample.py",
        ("--prompt", "7", "--guidance_scale", "-1"),
        r"--guidance_scale must be in \[0, 30\], got -1\.0",
    ),
    Case(
        "sample-zero-samples",
        "sample.py",
        ("--prompt", "7", "--num_samples", "0"),
        r"--num_samples must be at least 1, got 0",
    ),
    Case(
        "sample-mistyped-flag",
        "sample.py",
        ("--prompt", "7", "--sed", "1"),
        r"unrecognized arguments: --sed 1; did you mean '--seed'\?",
    ),
    Case(
        "sample-steps-over-timesteps",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{run}", "--steps", "1001", "--out", "{new}/x.png"),
        r"--steps 1001 exceeds the model's 1000 training timesteps",
    ),
    Case(
        "sample-missing-checkpoint",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{missing.pt}", "--out", "{new}/x.png"),
        r"checkpoint .*missing\.pt does not exist",
    ),
    Case(
        "sample-no-checkpoint-yet",
        "sample.py",
        ("--prompt", "7", "--output_dir", "{empty_dir}"),
        r"no checkpoint in .*empty_dir/checkpoints; train first \(python train\.py\) or pass --checkpoint PATH",
    ),
    Case(
        "sample-corrupt-checkpoint",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{flipped.pt}", "--out", "{new}/x.png"),
        r"checkpoint .*flipped\.pt is corrupt \(checksum mismatch",
    ),
    Case(
        "sample-other-text-encoder",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{openai_record.pt}", "--text_encoder", "random", "--out", "{new}/x.png"),
        r"checkpoint was trained with text encoder 'openai' \(.*\) but 'random' \(seed=0\) is loaded now; "
        r"rerun with --text_encoder openai",
    ),
    Case(
        "sample-would-overwrite",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{run}", "--out", "{existing.png}"),
        r"existing\.png exists; pass --overwrite to replace it or --out to write elsewhere",
    ),
    Case(
        "sample-out-under-a-file",
        "sample.py",
        ("--prompt", "7", "--checkpoint", "{run}", "--out", "{a_file}/x.png"),
        r"--out .*a_file cannot be created: .*a_file is a file; pick another folder",
    ),
    Case(
        "sample-cuda-absent",
        "sample.py",
        ("--prompt", "7", "--device", "cuda"),
        r"--device cuda asked for CUDA but none is available; use --device cpu",
        needs_no_cuda=True,
    ),
    # ---- evaluate.py
    Case(
        "evaluate-bad-guidance-list",
        "evaluate.py",
        ("--guidance_scale", "1,x"),
        r"--guidance_scale must be a number or a comma list like 1,2,4,8, got '1,x'",
        process=True,
    ),
    Case(
        "evaluate-negative-guidance",
        "evaluate.py",
        ("--guidance_scale", "2,-1"),
        r"--guidance_scale must be in \[0, 30\], got -1\.0",
    ),
    Case("evaluate-zero-samples", "evaluate.py", ("--num_samples", "0"), r"--num_samples must be at least 1, got 0"),
    Case(
        "evaluate-truncated-checkpoint",
        "evaluate.py",
        ("--checkpoint", "{truncated.pt}"),
        r"checkpoint .*truncated\.pt is truncated or not a checkpoint",
    ),
]


class RunsCode:
    """A pickle that, if ever unpickled without weights_only, would create a file named ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under ``root`` with its size and modification time (links: their target)."""
    return {
        str(p.relative_to(root)): (os.readlink(p),) if p.is_symlink() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The files the cases name: a trained micro run's checkpoints and damaged or foreign copies of them,
    configs, data."""
    root = tmp_path_factory.mktemp("inputs")
    run_dir = root / "trained"
    status, stderr = run_in_process("train.py", [*MICRO, "--output_dir", str(run_dir)], {}, root)
    assert status == 0, stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "checkpoint_epoch_0001.pt"
    data = checkpoint.read_bytes()
    files = {
        "root": root,
        "run": checkpoint,
        "mid_epoch": run_dir / "checkpoints" / "checkpoint_step_00000001.pt",
        "a_file": root / "a_file",
        "empty_dir": root / "empty_dir",
        "missing.pt": root / "missing.pt",
        "missing.yaml": root / "missing.yaml",
        "existing.png": root / "existing.png",
    }
    files["a_file"].write_text("a plain file, not a folder\n")
    files["empty_dir"].mkdir()
    files["existing.png"].write_bytes(b"an earlier result that must survive")
    for name, text in {"typo.yaml": "batchsize: 8\n", "invalid.yaml": "widths: [8, 16\n"}.items():
        files[name] = root / name
        files[name].write_text(text)
    files["truncated.pt"] = root / "truncated.pt"
    files["truncated.pt"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    files["flipped.pt"] = root / "flipped.pt"
    files["flipped.pt"].write_bytes(bytes(flipped))
    files["code.pt"] = root / "code.pt"
    files["marker"] = root / "code_ran"
    torch.save({"config": {}, "ema": {}, "text_encoder": {}, "payload": RunsCode(files["marker"])}, files["code.pt"])
    state = torch.load(checkpoint, weights_only=True)
    state["text_encoder"] = {**state["text_encoder"], "weights": "openai", "source": "hf-hub:timm/openai"}
    files["openai_record.pt"] = root / "openai_record.pt"
    save_checkpoint(state, files["openai_record.pt"])
    files["corrupt_mnist"] = corrupt_mnist_copy(root / "corrupt_mnist")
    return files


def corrupt_mnist_copy(folder: Path) -> Path:
    """The cached MNIST files (linked), except a copy of the training labels with one label changed."""
    folder.mkdir()
    cached = mnist_cache_dir() / "MNIST" / "raw"
    for name in IDX_FILES.values():
        (folder / name).symlink_to(cached / name)
    labels = folder / IDX_FILES["train_labels"]
    data = bytearray(labels.read_bytes())
    data[100] = (data[100] + 1) % 10
    labels.unlink()
    labels.write_bytes(bytes(data))
    return folder


def expand(args: tuple[str, ...], files: dict[str, Path], new: Path) -> list[str]:
    names = {**files, "new": new}
    return [re.sub(r"\{([^}]+)\}", lambda m: str(names[m.group(1)]), arg) for arg in args]


def check_error(case: Case, status: int, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert status == EXIT_USER_ERROR, f"exit status {status}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: ") and re.search(case.message, lines[0]), lines[0]


def skip_if_cuda(case: Case) -> None:
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("CUDA is available here")


def test_the_table_is_large_and_covers_every_script():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    scripts = {c.script for c in CASES}
    assert scripts == {"train.py", "sample.py", "evaluate.py"}
    assert sorted(c.script for c in CASES if c.process) == sorted(scripts)  # one real process per script
    assert all((ROOT / script).is_file() for script in scripts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, inputs, tmp_path):
    skip_if_cuda(case)
    before = snapshot(inputs["root"])
    status, stderr = run_in_process(case.script, expand(case.args, inputs, tmp_path / "new"), case.env, tmp_path)
    check_error(case, status, stderr)
    assert snapshot(inputs["root"]) == before and not any(tmp_path.rglob("*")), "a refused run wrote something"
    assert not inputs["marker"].exists(), "a checkpoint's pickle ran code"


@pytest.fixture(scope="module")
def real_runs(inputs, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """The ``process`` cases as real subprocesses, started all at once: {id: (status, stderr, their folder)}."""
    started = {}
    for case in (c for c in CASES if c.process):
        cwd = tmp_path_factory.mktemp(case.id)
        cmd = [sys.executable, str(ROOT / case.script), *expand(case.args, inputs, cwd / "new")]
        started[case.id] = (
            cwd,
            subprocess.Popen(
                cmd,
                cwd=cwd,
                env={**os.environ, **ENV, **case.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    return {key: (proc.wait(timeout=300), proc.stderr.read(), cwd) for key, (cwd, proc) in started.items()}


@pytest.mark.parametrize("case", [c for c in CASES if c.process], ids=[c.id for c in CASES if c.process])
@pytest.mark.slow
def test_bad_input_in_a_real_process(case: Case, real_runs):
    status, stderr, cwd = real_runs[case.id]
    check_error(case, status, stderr)
    assert not any(cwd.rglob("*")), "a refused run wrote something"


def test_allow_truncation_samples_and_says_what_was_kept(inputs, tmp_path):
    out = tmp_path / "long.png"
    args = [
        "--prompt",
        LONG_PROMPT,
        "--allow_truncation",
        "--checkpoint",
        str(inputs["run"]),
        "--steps",
        "2",
        "--num_samples",
        "1",
        "--out",
        str(out),
    ]
    status, stderr = run_in_process("sample.py", args, {}, tmp_path)
    assert status == 0, stderr
    assert (
        f"warning: prompt '{LONG_PROMPT}' was truncated to 8 tokens: 'a thick wide handwritten 7 slan'"
        in stderr.splitlines()
    )
    assert out.is_file()
