"""The checkpoint format: what TrainingState writes, and checkpoints of earlier formats still load,
sample and resume.

tests/fixtures/checkpoint_v1 holds files written by commit a5c598a's train.py (format 1, before the
format was versioned), tests/fixtures/checkpoint_v2 files written by commit a084e06's (format 2);
their READMEs give the commands. They are compared with what those commits produced from them,
within the rounding that another CPU's kernels may add.
"""

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data.captions
from data.captions import caption_set
from data.images import to_uint8
from data.shapes import IMAGE_SHAPE
from ddpm import SamplingOptions, generate, prompt_contexts
from models.checkpoint import (
    FORMAT_VERSION,
    SAMPLING_KEYS,
    SHIPPED,
    add_model_flags,
    find_model,
    load_checkpoint,
    save_checkpoint,
)
from models.loading import load_trained_model
from models.pretrained import RECIPES, ship
from runtime.errors import EXIT_USER_ERROR, UserError
from tests.helpers import ROOT, run_in_process, tiny_flags, write_untrained_checkpoint
from training.config import TrainConfig
from training.state import RESUME_KEYS, check_resumable

FIXTURES = ROOT / "tests" / "fixtures"
V1, V2 = FIXTURES / "checkpoint_v1", FIXTURES / "checkpoint_v2"
# The fixtures' train.py command (their README.md), without --output_dir.
RUN = tiny_flags(
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
)
RUNS = {V1: (*RUN, "--captions", "digits"), V2: RUN}  # a5c598a trained on the digit captions only
# Resumed weights against those the fixture's machine (AVX512-BF16) reached: bitwise there. Another CPU's
# kernels round differently, and Adam turns that into up to a whole step (the learning rate, 1e-3) for the
# few weights whose gradient is about 0. Measured: on the AVX2 machine, 1 element of 8 of a tensor beyond
# rtol=1e-4, atol=1e-6 by 4.0e-6 (v1); under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on the AVX512
# machine, at most 10 of 90,585 elements (0.011%) more than 2e-5 off, the worst by 1.9e-4 (v2). A resume that
# takes other steps (--cond_drop_prob 0.2) moves 43% of them by more than 2e-5, the worst by 3.1e-3.
NEAR, MOST, ALL = 2e-5, 1e-3, 1e-3  # at most MOST of the elements beyond NEAR, none beyond ALL (one step)


def assert_resumed_to(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    difference = torch.cat([(got[key].float() - expected[key].float()).abs().flatten() for key in expected])
    assert (difference > NEAR).float().mean() <= MOST and difference.max() <= ALL, difference.max()


def test_a_fresh_checkpoint_holds_exactly_the_documented_keys(tmp_path):
    payload = torch.load(write_untrained_checkpoint(tmp_path / "c.pt"), weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert set(payload) == {"format_version", *SAMPLING_KEYS, *RESUME_KEYS}
    assert not set(SAMPLING_KEYS) & set(RESUME_KEYS)
    assert payload["text_encoder"]["seed"] == 0 and payload["vocabulary"]["name"] == "styles"


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    path = write_untrained_checkpoint(tmp_path / "c.pt")
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, path)  # as a newer writer would
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}, newer than this code's") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_version_1_loads_with_the_layout_it_was_trained_with():
    payload = load_checkpoint(V1 / "checkpoint_step_00000003.pt")
    assert payload["format_version"] == FORMAT_VERSION and payload["step"] == 3
    raw = torch.load(V1 / "checkpoint_step_00000003.pt", weights_only=True)
    assert "format_version" not in raw and "groups" not in raw["config"]  # really the old format
    assert payload["config"]["groups"] == 8 and payload["config"]["widths"] == [8, 16]
    assert payload["vocabulary"] == {"name": "digits", "fingerprint": caption_set("digits").fingerprint}


def test_version_2_loads_with_its_vocabulary_and_the_seed_as_a_number():
    payload = load_checkpoint(V2 / "checkpoint_step_00000003.pt")
    raw = torch.load(V2 / "checkpoint_step_00000003.pt", weights_only=True)
    assert raw["format_version"] == 2 and "vocabulary" not in raw and "seed" not in raw["text_encoder"]
    assert payload["format_version"] == FORMAT_VERSION and payload["step"] == 3
    assert payload["vocabulary"] == {"name": "styles", "fingerprint": caption_set("styles").fingerprint}
    assert payload["text_encoder"]["seed"] == 0 and payload["text_encoder"]["source"] == "seed=0"


THEN = SamplingOptions(sampler="dpmpp_2m", steps=5)  # the fixtures' images were sampled with the default then


@pytest.mark.parametrize("fixture", [V1, V2], ids=["v1", "v2"])
def test_an_old_checkpoint_samples_what_it_sampled_then(fixture):
    model = load_trained_model(fixture / "checkpoint_epoch_0002.pt", torch.device("cpu"))
    cond, uncond = prompt_contexts(model.encoder.encode, ["7", "a handwritten two"], 2, "")
    images = to_uint8(generate(model.net, model.diffusion, cond, uncond, THEN, image_shape=IMAGE_SHAPE, seed=0))
    then = np.load(fixture / "samples_7_two_steps5_seed0.npy")
    difference = np.abs(images.astype(int) - then.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05


@pytest.mark.parametrize("fixture", [V1, V2], ids=["v1", "v2"])
def test_an_old_checkpoint_resumes_mid_epoch_to_the_weights_it_reached_then(tmp_path, fixture):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture / "checkpoint_step_00000003.pt", tmp_path / "run" / "checkpoints")
    args = [*RUNS[fixture], "--output_dir", str(tmp_path / "run"), "--resume"]
    status, stderr = run_in_process("train.py", args, {}, tmp_path)
    assert status == 0, stderr[-2000:]
    now = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True)
    then = torch.load(fixture / "checkpoint_epoch_0002.pt", weights_only=True)
    assert now["format_version"] == FORMAT_VERSION and now["step"] == then["step"] == 8
    assert now["ema"]["updates"] == then["ema"]["updates"] == 8
    assert_resumed_to(now["model"], then["model"])
    assert_resumed_to(now["ema"]["weights"], then["ema"]["weights"])


def test_a_version_1_checkpoint_is_refused_by_the_wrong_run_in_one_line(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(V1 / "checkpoint_step_00000003.pt", tmp_path / "run" / "checkpoints")
    args = [*RUNS[V1], "--seed", "1", "--output_dir", str(tmp_path / "run"), "--resume"]
    status, stderr = run_in_process("train.py", args, {}, tmp_path)
    assert status == EXIT_USER_ERROR
    assert "was written with seed=0 but this run has seed=1" in stderr and "Traceback" not in stderr


def with_vocabulary(tmp_path, fingerprint: str):
    """An untrained checkpoint that says it was trained on another 'styles' vocabulary."""
    path = write_untrained_checkpoint(tmp_path / "c.pt")
    payload = torch.load(path, weights_only=True)
    save_checkpoint({**payload, "vocabulary": {"name": "styles", "fingerprint": fingerprint}}, path)
    return path


def test_resume_refuses_another_vocabulary_naming_both(tmp_path):
    path = with_vocabulary(tmp_path, "0123456789abcdef")
    cfg = TrainConfig.from_flat(load_checkpoint(path)["config"])
    with pytest.raises(UserError) as err:
        check_resumable(load_checkpoint(path), cfg, 1, path)
    now = caption_set("styles").fingerprint
    assert str(err.value) == (
        f"{path} was trained on the caption vocabulary 'styles' (fingerprint 0123456789abcdef) but this run's is "
        f"'styles' (fingerprint {now}); resume with the code that trained it, or start fresh"
    )


def test_sampling_refuses_a_checkpoint_whose_vocabulary_the_code_has_changed(tmp_path, monkeypatch):
    path = write_untrained_checkpoint(tmp_path / "c.pt")
    then = caption_set("styles").fingerprint
    load_trained_model(path, torch.device("cpu"))  # the vocabulary it was trained on: loads
    styles = data.captions.VOCABULARIES["styles"]
    changed = dataclasses.replace(styles, held_out_pairs=styles.held_out_pairs - {(4, "thick")})
    monkeypatch.setitem(data.captions.VOCABULARIES, "styles", changed)
    with pytest.raises(UserError, match=f"trained on the caption vocabulary 'styles' \\(fingerprint {then}\\)") as err:
        load_trained_model(path, torch.device("cpu"))
    assert "\n" not in str(err.value) and caption_set("styles").fingerprint in str(err.value)


def test_the_shipped_model_is_remade_through_the_one_writer_and_samples(tmp_path):
    checkpoint = write_untrained_checkpoint(tmp_path / "c.pt")
    summary = {"trained pairs": {"digit_accuracy": 0.5}, "held-out pairs": {"digit_accuracy": 0.25}}
    scores = {"accuracy": 0.5, "fmd": 9.0, "fmd_floor": 1.0}
    evaluation = {
        **{"sampler": "ddim", "steps": 5, "guidance_scales": [6.0], "seed": 0, "bf16": False, "device": "cpu"},
        "results": [{"guidance_scale": 6.0, "sets": {"seen": scores}, "styles": {"summary": summary}}],
    }
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    record = ship(checkpoint, tmp_path / "eval.json", "cpu", folder=tmp_path)
    assert record["command"] == RECIPES["cpu"] and record["weights"] == "cpu.pt"
    assert record["scores"] == [
        {"guidance_scale": 6.0, "accuracy_seen": 0.5, "fmd_seen": 9.0, "fmd_floor_seen": 1.0, "styles": summary}
    ]
    raw = torch.load(tmp_path / "cpu.pt", weights_only=True)
    assert set(raw) == {"format_version", *SAMPLING_KEYS} and raw["format_version"] == FORMAT_VERSION
    assert all(w.dtype == torch.float16 for w in raw["ema"]["weights"].values() if w.is_floating_point())
    model = load_trained_model(tmp_path / "cpu.pt", torch.device("cpu"))
    assert model.saved.vocabulary.name == "styles" and model.saved.unet.widths == (16, 32)
    guide = ship(checkpoint, None, "guide", folder=tmp_path)  # a model that only guides: no scores of its own
    assert guide["command"] == RECIPES["guide"] and guide["evaluation"] is None and guide["scores"] == []


def test_the_model_a_command_loads_follows_the_one_rule(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default folder, outputs/mnist, is empty here
    run = tmp_path / "run"
    assert find_model(tmp_path / "named.pt", run) == tmp_path / "named.pt"  # --checkpoint: that file
    with pytest.raises(UserError, match=f"no checkpoint in {run / 'checkpoints'}; train first"):
        find_model(None, run)  # a named folder without a checkpoint: no fallback
    assert find_model(None, None) == SHIPPED  # nothing named and nothing trained: the shipped model, said once
    assert capsys.readouterr().err.count("using the shipped model models/pretrained/fast.pt") == 1
    write_untrained_checkpoint(run / "checkpoints" / "checkpoint_epoch_0001.pt")  # step 0
    shutil.copy(V1 / "checkpoint_step_00000003.pt", run / "checkpoints")
    assert find_model(None, run) == run / "checkpoints" / "checkpoint_step_00000003.pt"  # the highest step


@pytest.mark.parametrize("command", ["sample", "evaluate", "serve"])
def test_every_command_names_its_model_by_the_same_flags_and_rule(command, tmp_path, monkeypatch):
    module = importlib.import_module(command)
    flags = {a.dest: a for a in module.build_parser()._actions}
    reference = argparse.ArgumentParser()
    add_model_flags(reference)
    for action in reference._actions[1:]:  # after -h
        assert flags[action.dest].help == action.help and flags[action.dest].default is None
    calls = []
    monkeypatch.setattr(module, "find_model", lambda *named: calls.append(named) or 1 / 0)
    argv = {"sample": ["--prompt", "7"], "evaluate": [], "serve": ["--port", "0"]}[command]
    monkeypatch.setattr(sys, "argv", [command, *argv, "--output_dir", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError):
        module.main()
    assert calls == [(None, tmp_path)]


def test_the_shipped_models_evaluation_goes_to_outputs_not_into_the_repository():
    import evaluate

    assert evaluate.results_dir(SHIPPED) == Path("outputs/pretrained")
    assert evaluate.results_dir(Path("run/checkpoints/c.pt")) == Path("run/checkpoints")
