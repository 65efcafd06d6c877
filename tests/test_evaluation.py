"""Tests of evaluation/ and evaluate.py: the committed judge against the real MNIST test set,
the metrics against closed forms, the style report of a vocabulary with an attribute added, and
evaluate.py end to end on a configs/tiny.yaml checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from data.captions import DIGIT_WORDS, VOCABULARIES, Attribute, caption_set, plan_prompts, style_thresholds
from data.mnist import load_mnist
from data.morphometry import measure_digits
from evaluation.judge import JUDGE_PATH, judge_images, judge_record, load_judge
from evaluation.metrics import accuracy_by, conditional_accuracy, frechet_distance, gaussian_stats
from evaluation.reference import split_halves
from evaluation.styles import StyleReference, evaluate_styles, style_picture_rows, style_tables
from runtime.errors import UserError
from tests.helpers import PROCESS_ENV, ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ----------------------------------------------------------------------------- the judge
def test_committed_judge_reaches_recorded_accuracy_on_mnist_test_set():
    record = judge_record()
    assert hashlib.sha256(JUDGE_PATH.read_bytes()).hexdigest() == record["weights_sha256"]
    assert JUDGE_PATH.stat().st_size < 1_000_000
    mnist = load_mnist()
    logits, features = judge_images(load_judge(), mnist.test_images)
    measured = float(np.mean(logits.argmax(1) == mnist.test_labels))
    assert measured >= 0.993
    assert measured == pytest.approx(record["test_accuracy"], abs=3e-4)  # a few borderline digits may flip across CPUs
    assert features.shape == (10_000, 128) and features.dtype == np.float64


# ----------------------------------------------------------------------------- accuracy
def test_conditional_accuracy_on_hand_made_logits():
    logits = np.array([[5.0, 1, 0], [0, 3, 1], [0, 4, 2], [9, 0, 0]])  # arg-max: 0, 1, 1, 0
    digits = np.array([0, 1, 2, 2])
    assert conditional_accuracy(logits, digits) == 0.5
    assert accuracy_by(logits, digits, digits) == {0: 1.0, 1: 1.0, 2: 0.0}
    assert accuracy_by(logits, digits, [("a", "x"), ("b", "y"), ("b", "y"), ("a", "x")]) == {
        ("a", "x"): 0.5,
        ("b", "y"): 0.5,
    }
    with pytest.raises(ValueError):
        conditional_accuracy(logits[:0], digits[:0])


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_of_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(by_hand, rel=1e-10)


def test_frechet_distance_of_rotated_commuting_gaussians():
    """S1 = Q D1 Q^T and S2 = Q D2 Q^T commute: the distance is that of D1, D2 (Q preserves it)."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    shift = rng.normal(size=6)
    by_hand = shift @ shift + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    got = frechet_distance(np.zeros(6), q @ np.diag(d1) @ q.T, shift, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(by_hand, rel=1e-10)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    """For 2x2 PSD A, B: Tr sqrt(AB) = sqrt(Tr(AB) + 2 sqrt(det A det B)), since (sqrt(l1) + sqrt(l2))^2
    = l1 + l2 + 2 sqrt(l1 l2) for the eigenvalues l1, l2 of AB."""
    a = np.array([[2.0, 0.7], [0.7, 1.0]])
    b = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(a @ b, b @ a)
    trace_sqrt = math.sqrt(np.trace(a @ b) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    by_hand = 1.0**2 + 2.0**2 + np.trace(a) + np.trace(b) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), a, np.array([1.0, -2.0]), b) == pytest.approx(by_hand, rel=1e-10)
    assert frechet_distance(np.array([1.0, -2.0]), b, np.zeros(2), a) == pytest.approx(by_hand, rel=1e-10)


def test_frechet_distance_of_singular_and_equal_gaussians():
    e1, e2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])  # orthogonal lines: Tr sqrt(S1 S2) = 0
    assert frechet_distance(np.zeros(2), e1, np.zeros(2), e2) == pytest.approx(2.0, abs=1e-12)
    s = np.array([[1.0, 0.9], [0.9, 1.0]])
    assert frechet_distance(np.ones(2), s, np.ones(2), s) == pytest.approx(0.0, abs=1e-12)


def test_sample_statistics_converge_to_the_true_gaussian():
    rng = np.random.default_rng(2)
    mu, root = np.array([1.0, -1.0, 0.5]), rng.normal(size=(3, 3))
    sigma = root @ root.T
    samples = rng.multivariate_normal(mu, sigma, size=200_000)
    assert frechet_distance(*gaussian_stats(samples), mu, sigma) < 1e-3
    far = frechet_distance(*gaussian_stats(samples + 1), mu, sigma)
    assert far == pytest.approx(3.0, rel=0.01)  # ||(1, 1, 1)||^2, covariance unchanged


# ----------------------------------------------------------------------------- what is sampled
def test_real_halves_split_every_digit_evenly():
    labels = np.repeat(np.arange(10), np.arange(10, 20))
    a, b = split_halves(labels)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == len(labels)
    assert np.array_equal(np.bincount(labels[a]), np.arange(10, 20) // 2)


def test_plan_gives_every_digit_every_template_and_names_the_right_digit():
    vocabulary = VOCABULARIES["styles"]
    plan = plan_prompts(11, vocabulary.prompt_sets)  # 11 >= 8 templates: each digit gets each
    assert len(plan.prompts) == 2 * 10 * 11 and np.array_equal(np.bincount(plan.digits), np.full(10, 22))
    names = {str(d): d for d in range(10)} | {w: d for d, w in enumerate(DIGIT_WORDS)}
    for prompt, digit in zip(plan.prompts, plan.digits):
        assert [names[w] for w in prompt.split() if w in names] == [digit], prompt
    for name, templates in vocabulary.prompt_sets.items():
        for digit in range(10):
            used = {t for t, d, s in zip(plan.templates, plan.digits, plan.sets) if d == digit and s == name}
            assert used == set(templates), (name, digit)


# ----------------------------------------------------------------------------- a new attribute
STYLES = VOCABULARIES["styles"]
TALL = dataclasses.replace(  # what adding "tall" takes: one Attribute and its held-out pair
    STYLES,
    name="styles+height",
    attributes=(*STYLES.attributes, Attribute("height", "short", "tall", "px", before=True)),
    held_out_pairs=STYLES.held_out_pairs | {(2, "tall")},
)


def bar(rows: int) -> np.ndarray:
    """A vertical bar ``rows`` tall and 3 columns wide, centred."""
    image = np.zeros((28, 28), np.uint8)
    image[14 - rows // 2 : 14 - rows // 2 + rows, 12:15] = 255
    return image


def bars(prompts: list[str], per_prompt: int, negative: str) -> np.ndarray:
    """A fake model: a bar 22 rows tall for "tall" (or the negative prompt "short"), 8 for "short" (or
    the negative "tall"), else 15; image j is j % 2 rows shorter, as seeds would vary it."""

    def rows(words: list[str]) -> int:
        return 22 if "tall" in words or negative == "short" else 8 if "short" in words or negative == "tall" else 15

    return np.stack([[bar(rows(p.split()) - j % 2) for j in range(per_prompt)] for p in prompts])


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the bars vary in height alone: no thick or thin ones
def test_an_added_attribute_is_captioned_and_reported_with_no_other_edit():
    """Real digits' side: bars 8..22 rows tall for every digit, so "tall" is the top quarter (> ~18.5 rows)."""
    captions = caption_set(TALL)
    assert {"a tall 7", "a short 2", "a 7 slanted left"} <= set(captions.prompts) and "a tall 2" not in captions.prompts
    heights, labels = np.tile(np.arange(8, 23), 10), np.repeat(np.arange(10), 15)
    measures = measure_digits(np.stack([bar(h) for h in heights]))
    reference = StyleReference(TALL, style_thresholds(TALL, measures, labels), measures, labels)
    report = evaluate_styles(bars, reference, load_judge(), per_prompt=2)

    tall = [p for p in report["pairs"] if p["word"] == "tall"]
    assert [p["digit"] for p in tall] == list(range(10)) and [p["digit"] for p in tall if p["held_out"]] == [2]
    assert all(p["measure"] == "height" and p["attribute_accuracy"] == 1 and p["shift"] > 5 for p in tall)
    assert all(p["attribute_accuracy"] == 1 and p["shift"] < -5 for p in report["pairs"] if p["word"] == "short")
    negative = {n["negative_prompt"]: n for n in report["negative"]}
    assert negative["tall"]["measure"] == "height" and negative["tall"]["shift"] < -5 < 5 < negative["short"]["shift"]
    tables = style_tables(report, TALL)
    assert '| "tall" | 9 trained | ' in tables and '| "tall" | 2 | ' in tables and '| "short" | 10 trained | ' in tables
    assert '| "tall" | height | -' in tables and " px |" in tables.split('| "tall" | 2 |')[1].splitlines()[0]
    assert {"a short 7", "7", "a tall 7"} <= set(style_picture_rows(TALL))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_training_logs_judge_metrics(tiny_run):
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval_accuracy" in m]
    assert [m["epoch"] for m in evals] == [1, 2]
    for m in evals:
        assert 0 <= m["eval_accuracy"] <= 1 and m["eval_samples"] == 20
        assert math.isfinite(m["eval_fmd"]) and m["eval_fmd"] >= 0 and m["eval_fmd_floor"] >= 0


@pytest.mark.slow
def test_evaluate_cli_writes_tables_json_and_sweep_plot(tiny_run):
    checkpoint = tiny_run / "checkpoints" / "checkpoint_epoch_0002.pt"
    proc = check(
        run(
            "evaluate.py",
            "--checkpoint",
            str(checkpoint),
            "--num_samples",
            "3",
            "--steps",
            "2",
            "--guidance_scale",
            "1,3",
            "--seed",
            "5",
            "--batch_size",
            "16",
            "--style_samples",
            "2",
        )
    )
    assert "| seen wordings | 30 |" in proc.stdout and "### guidance sweep" in proc.stdout
    stem = "checkpoint_epoch_0002_eval_dpmpp_2m_sde_2steps_cfg1-3_n3_seed5"
    report = json.loads((checkpoint.parent / f"{stem}.json").read_text())
    assert (report["sampler"], report["steps"], report["seed"], report["epoch"]) == ("dpmpp_2m_sde", 2, 5, 2)
    assert report["guidance_scales"] == [1.0, 3.0] and report["wall_seconds"] > 0
    assert report["options"] == {  # the other sampling options, JSON's null for the interval's open end
        "spacing": "trailing",
        "threshold": "clip",
        "eta": None,
        "guidance_interval": [2.0, None],
        "guidance_rescale": 0.0,
        "guidance_parallel": 1.0,
    }
    assert 0.99 <= report["judge"]["accuracy_on_real_half_a"] <= 1
    assert report["reference"]["half_a_images"] + report["reference"]["half_b_images"] == 10_000
    for result in report["results"]:
        sets = result["sets"]
        assert {name: s["samples"] for name, s in sets.items()} == {"seen": 30, "held-out": 30, "all": 60}
        for s in sets.values():
            assert 0 <= s["accuracy"] <= 1 and len(s["per_digit"]) == 10
            assert all(0 <= a <= 1 for a in s["per_digit"])
            assert math.isfinite(s["fmd"]) and s["fmd"] >= 0 and 0 <= s["fmd_floor"] < s["fmd"]
            assert s["floor_samples"] == s["samples"]
        all_correct = sum(s["accuracy"] * s["samples"] for n, s in sets.items() if n != "all")
        assert sets["all"]["accuracy"] == pytest.approx(all_correct / 60)
        templates = result["per_template"]
        assert len(templates) == 8 + 3 and sum(t["samples"] for t in templates) == 60
        assert result["styles"]["per_prompt"] == 2  # --style_samples
    plot = Image.open(checkpoint.parent / f"{stem}.png")
    assert plot.format == "PNG" and plot.width > 600


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_samples", "0"], "--num_samples must be at least 1"),
        (["--guidance_scale", "1,x"], "--guidance_scale must be a number or a comma list"),
        (["--guidance_scale", "4,-1"], "--guidance_scale must be in \\[0, 30\\], got -1.0"),
        (["--sampler", "euler"], "--sampler must be one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, got 'euler'"),
    ],
)
def test_evaluate_rejects_bad_flags(flags, message):
    with pytest.raises(UserError, match=message):
        evaluate.parse_args(flags)


def test_output_names_keep_their_form_and_add_other_options_only_when_changed():
    path = Path("run/checkpoint_epoch_0002.pt")
    args = evaluate.parse_args(["--steps", "2", "--guidance_scale", "1,3", "--num_samples", "3", "--seed", "5"])
    assert (
        evaluate.output_path(args, path, ".json").name
        == "checkpoint_epoch_0002_eval_dpmpp_2m_sde_2steps_cfg1-3_n3_seed5.json"
    )
    args = evaluate.parse_args(["--threshold", "none", "--guidance_interval", "0", "inf", "--guidance_scale", "2"])
    args.steps = 20  # no --steps: evaluate() names the model's own default (a guided model's 20) once it is loaded
    assert evaluate.output_path(args, path, ".png").name == (
        "checkpoint_epoch_0002_eval_dpmpp_2m_sde_20steps_cfg2_n100_seed0_thresholdnone_guidance_interval0-inf.png"
    )


@pytest.mark.slow
def test_evaluate_missing_checkpoint_fails_in_one_line(tmp_path):
    proc = run("evaluate.py", "--checkpoint", str(tmp_path / "none.pt"))
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
