"""The checkpoint format: what TrainingState writes, and checkpoints of earlier formats still load,
sample and resume.

tests/fixtures/checkpoint_v1 holds files written by commit a5c598a's train.py (format 1, before the
format was versioned; its README gives the command). They are compared with what that commit
produced from them, within the rounding that another CPU's kernels may add.
"""

import shutil

import numpy as np
import pytest
import torch

from data.images import to_uint8
from data.shapes import IMAGE_SHAPE
from ddpm import SamplingOptions, generate, prompt_contexts
from models.loading import load_trained_model
from runtime.errors import EXIT_USER_ERROR, UserError
from tests.helpers import ROOT, run_in_process, tiny_flags, write_untrained_checkpoint
from training.checkpoints import load_checkpoint, save_checkpoint
from training.state import FORMAT_VERSION, RESUME_KEYS, SAMPLING_KEYS

V1 = ROOT / "tests" / "fixtures" / "checkpoint_v1"
# The fixture's train.py command (tests/fixtures/checkpoint_v1/README.md), without --output_dir.
V1_RUN = tiny_flags(
    widths=[8, 16],
    head_dim=8,
    train_subset=64,
    batch_size=16,
    num_epochs=2,
    log_every=1,
    samples_per_digit=1,
    sample_steps=2,
    checkpoint_every_steps=3,
    device="cpu",
    precision="fp32",
    captions="digits",  # what that commit trained with
)


def test_a_fresh_checkpoint_holds_exactly_the_documented_keys(tmp_path):
    payload = torch.load(write_untrained_checkpoint(tmp_path / "c.pt"), weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert set(payload) == {"format_version", *SAMPLING_KEYS, *RESUME_KEYS}
    assert not set(SAMPLING_KEYS) & set(RESUME_KEYS)


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    path = write_untrained_checkpoint(tmp_path / "c.pt")
    payload = torch.load(path, weights_only=True)
    save_checkpoint({**payload, "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}, newer than this code's") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_version_1_loads_with_the_layout_it_was_trained_with():
    payload = load_checkpoint(V1 / "checkpoint_step_00000003.pt")
    assert payload["format_version"] == FORMAT_VERSION and payload["step"] == 3
    raw = torch.load(V1 / "checkpoint_step_00000003.pt", weights_only=True)
    assert "format_version" not in raw and "groups" not in raw["config"]  # really the old format
    assert payload["config"]["groups"] == 8 and payload["config"]["widths"] == [8, 16]


def test_version_1_samples_what_it_sampled_then():
    model = load_trained_model(V1 / "checkpoint_epoch_0002.pt", torch.device("cpu"))
    cond, uncond = prompt_contexts(model.encoder.encode, ["7", "a handwritten two"], 2, "")
    images = to_uint8(
        generate(model.net, model.diffusion, cond, uncond, SamplingOptions(steps=5), image_shape=IMAGE_SHAPE, seed=0)
    )
    then = np.load(V1 / "samples_7_two_steps5_seed0.npy")
    difference = np.abs(images.astype(int) - then.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05


def test_version_1_resumes_mid_epoch_to_the_weights_it_reached_then(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(V1 / "checkpoint_step_00000003.pt", tmp_path / "run" / "checkpoints")
    status, stderr = run_in_process(
        "train.py", [*V1_RUN, "--output_dir", str(tmp_path / "run"), "--resume"], {}, tmp_path
    )
    assert status == 0, stderr[-2000:]
    now = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True)
    then = torch.load(V1 / "checkpoint_epoch_0002.pt", weights_only=True)
    assert now["format_version"] == FORMAT_VERSION and now["step"] == then["step"] == 8
    assert now["ema"]["updates"] == then["ema"]["updates"] == 8
    for part in ("model", "ema"):
        got, expected = (s["model"] if part == "model" else s["ema"]["weights"] for s in (now, then))
        for key in expected:  # bitwise on the machine that wrote them; other CPUs round differently
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)


def test_a_version_1_checkpoint_is_refused_by_the_wrong_run_in_one_line(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(V1 / "checkpoint_step_00000003.pt", tmp_path / "run" / "checkpoints")
    args = [*V1_RUN, "--seed", "1", "--output_dir", str(tmp_path / "run"), "--resume"]
    status, stderr = run_in_process("train.py", args, {}, tmp_path)
    assert status == EXIT_USER_ERROR
    assert "was written with seed=0 but this run has seed=1" in stderr and "Traceback" not in stderr
