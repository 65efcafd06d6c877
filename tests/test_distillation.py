"""Distillation (ddpm/distillation.py, training/distillation.py, distill.py) against closed forms.

Gaussian data x0 ~ N(mu, s^2) has the exact noise predictor
    eps*(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
and its probability-flow ODE keeps the standardised state constant, so from x_t at alpha_bar ab the
solution at alpha_bar ab' is
    x' = sqrt(ab') mu + sqrt(ab' s^2 + 1 - ab') (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab)
(the ODE's flow is the map between the two Gaussian marginals that preserves standardised values).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.captions import EMPTY_PROMPT, caption_set, vocabulary_named
from data.prompts import named
from data.shapes import NUM_DIGITS
from ddpm import DiffusionConfig, GaussianDiffusion, classifier_free_guidance
from ddpm.distillation import (
    CLEAN,
    alpha_bar_at,
    as_sampler_net,
    distillation_loss,
    jump_target_x0,
    landings,
    stops,
    student_jumps,
    teacher_trajectory,
)
from ddpm.samplers import sample_ddim, sample_dpmpp_2m
from evaluation.judge import judge_images, load_judge
from models.checkpoint import PRETRAINED_DIR, SavedModel, load_checkpoint
from models.pretrained import ship
from models.unet import UNet, UNetConfig
from tests.helpers import PROCESS_ENV, ROOT, finish, run_in_process, state_bytes, wait_for
from text2digit import InvalidRequest, Text2Digit, make_request
from training.distillation import DistillConfig, draw_conditions, negative_rows

T = 1000
DIFFUSION = GaussianDiffusion.from_config(DiffusionConfig(T, "v"))
MU, STD = 0.3, 0.5


def exact_eps(x: torch.Tensor, t: torch.Tensor, mu: float = MU, std: float = STD) -> torch.Tensor:
    ab = DIFFUSION.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)


def exact_flow(x: torch.Tensor, ab: float, ab_to: float, mu: float = MU, std: float = STD) -> torch.Tensor:
    standardised = (x - math.sqrt(ab) * mu) / math.sqrt(ab * std**2 + 1 - ab)
    return math.sqrt(ab_to) * mu + math.sqrt(ab_to * std**2 + 1 - ab_to) * standardised


def test_the_grids_of_a_1_2_4_step_student_lie_on_a_20_step_trailing_teacher():
    assert landings(T, 4) == {999: 749, 749: 499, 499: 249, 249: CLEAN}
    assert landings(T, 2) == {999: 499, 499: CLEAN}
    assert landings(T, 1) == {999: CLEAN}
    assert sorted(student_jumps(T, (1, 2, 4))) == sorted(
        [(999, 749), (749, 499), (499, 249), (249, CLEAN), (999, 499), (499, CLEAN), (999, CLEAN)]
    )
    assert stops(T, (1, 2, 4)) == [999, 749, 499, 249]
    assert alpha_bar_at(DIFFUSION, torch.tensor([CLEAN, 0])).tolist() == [1.0, float(DIFFUSION.alphas_cumprod[0])]


@pytest.mark.parametrize("t, s", [(999, 749), (749, 249), (249, CLEAN)])
def test_one_ddim_step_with_the_jump_target_lands_on_the_teacher_state(t, s):
    """DDIM (eta 0) from x_t with x0~ lands on x_s: the step of Song et al. 2021, eq. 12, written out here."""
    gen = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64), torch.randn(4, 1, 5, 5, generator=gen)
    ab_t, ab_s = DIFFUSION.alpha_bar(t), 1.0 if s == CLEAN else DIFFUSION.alpha_bar(s)
    x0 = jump_target_x0(x_t, x_s.double(), ab_t, ab_s)
    eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    landed = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps
    torch.testing.assert_close(landed, x_s.double(), rtol=0, atol=1e-9)


def test_the_teacher_trajectory_follows_the_exact_ode_of_gaussian_data():
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    states = teacher_trajectory(sample_dpmpp_2m, exact_eps, x_T, DIFFUSION, 200, stops(T, (1, 2, 4)))
    for k, t in enumerate([999, 749, 499, 249]):
        expected = exact_flow(x_T, DIFFUSION.alpha_bar(999), DIFFUSION.alpha_bar(t))
        torch.testing.assert_close(states[:, k], expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(states[:, -1], exact_flow(x_T, DIFFUSION.alpha_bar(999), 1.0), rtol=0, atol=2e-3)


Condition = tuple[float, float]  # (guidance scale, the negative prompt's "token": the mean it stands for)
EMPTY = -0.4  # the unconditional prompt's mean in the guided toy: the default negative prompt


class AffineStudent(torch.nn.Module):
    """x0~ = a x_t + b, one (a, b) per jump and condition (scale, negative prompt): the exact form of a linear
    ODE's flow map."""

    def __init__(self, jumps: list[tuple[int, int]], conditions: list[Condition]):
        super().__init__()
        self.jumps, self.conditions = jumps, conditions
        self.a = torch.nn.Parameter(torch.zeros(len(jumps), len(conditions), dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(len(jumps), len(conditions), dtype=torch.float64))

    def forward(self, x, t, context, guidance, lands_on, negative):
        j = torch.tensor([self.jumps.index((int(a), int(b))) for a, b in zip(t, lands_on)])
        negatives = negative.reshape(-1).expand(len(x)).tolist()
        k = torch.tensor([self.conditions.index((float(w), n)) for w, n in zip(guidance, negatives)])
        shape = (-1, *[1] * (x.ndim - 1))
        x0 = self.a[j, k].reshape(shape) * x + self.b[j, k].reshape(shape)
        ab = DIFFUSION.alphas_cumprod[t].reshape(shape)
        return (ab.sqrt() * x - x0) / (1 - ab).sqrt()  # v of that x0


def distil(eps_fn, conditions: list[Condition], steps: int = 600) -> AffineStudent:
    """Train an AffineStudent on 200-step teacher trajectories (``eps_fn(w, negative)``) in each condition with
    distillation_loss."""
    keep, jumps = stops(T, (1, 2, 4)), student_jumps(T, (1, 2, 4))
    gen = torch.Generator().manual_seed(2)
    data = []
    for w, negative in conditions:
        x_T = torch.randn(256, 1, 2, 2, generator=gen, dtype=torch.float64)
        data.append(teacher_trajectory(sample_dpmpp_2m, eps_fn(w, negative), x_T, DIFFUSION, 200, keep))
    student = AffineStudent(jumps, conditions)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    where = {t: i for i, t in enumerate(keep)} | {CLEAN: len(keep)}
    table = torch.tensor(conditions, dtype=torch.float64)
    for _ in range(steps):
        k = torch.randint(len(conditions), (64,), generator=gen)
        pick = torch.randint(256, (64,), generator=gen)
        jump = torch.tensor(jumps)[torch.randint(len(jumps), (64,), generator=gen)]
        t, s = jump[:, 0], jump[:, 1]
        states = torch.stack(data)[k, pick]
        x_t, x_s = (
            states[torch.arange(64), [where[int(v)] for v in t]],
            states[torch.arange(64), [where[int(v)] for v in s]],
        )
        guidance, negative = table[k, 0], table[k, 1].reshape(-1, 1, 1)
        loss = distillation_loss(student, DIFFUSION, x_t, x_s, t, s, None, guidance, negative)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student


def sample_student(student, steps: int, scale: float, x_T: torch.Tensor, negative: float = EMPTY) -> torch.Tensor:
    net = as_sampler_net(student, DIFFUSION, steps, scale, torch.full((1, 1, 1), negative, dtype=torch.float64))
    return sample_ddim(lambda x, t: DIFFUSION.to_eps(x, t, net(x, t, None)), x_T, DIFFUSION, steps)


def test_a_student_of_the_exact_gaussian_predictor_lands_on_the_exact_ode_endpoint():
    """Distilled from the exact noise predictor, the student's 1-, 2- and 4-step samples are the exact
    probability-flow ODE's endpoint of their noise (closed form above), within 0.01 (data std 0.5)."""
    student = distil(lambda w, negative: exact_eps, [(1.0, EMPTY)])
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = exact_flow(x_T, DIFFUSION.alpha_bar(999), 1.0)
    for steps in (1, 2, 4):
        torch.testing.assert_close(sample_student(student, steps, 1.0, x_T), exact, rtol=0, atol=0.01)


def guided_gaussians(w: float, negative: float):
    """Classifier-free guidance of the exact predictor of Gaussian 'prompts' (the context: each image's mean,
    as a text encoder's tokens would say which prompt): the prompt's mean 0.3, guided away from ``negative``'s
    (the empty prompt's -0.4, or a negative prompt's)."""

    def net(x, t, context):
        return exact_eps(x, t, mu=context.reshape(-1, 1, 1, 1), std=STD)

    cond, uncond = torch.full((256, 1), 0.3, dtype=torch.float64), torch.full((1, 1), negative, dtype=torch.float64)
    eps_diffusion = GaussianDiffusion.from_config(DiffusionConfig(T, "eps"))
    return classifier_free_guidance(net, eps_diffusion, cond, uncond, w)


def test_guidance_distillation_reproduces_the_guided_teacher_in_one_step():
    """The student, told the scale and the negative prompt, matches the guided teacher's 200-step ODE endpoint
    at every scale it learnt, guided away from the empty prompt (-0.4) or from a negative one (0.8)."""
    conditions = [(1.0, EMPTY), (3.0, EMPTY), (5.0, EMPTY), (3.0, 0.8), (5.0, 0.8)]
    student = distil(guided_gaussians, conditions, steps=1500)
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    teacher = {c: sample_dpmpp_2m(guided_gaussians(*c), x_T, DIFFUSION, 200) for c in conditions}
    for w, negative in conditions:
        student_x0 = sample_student(student, 1, w, x_T, negative)
        torch.testing.assert_close(student_x0, teacher[w, negative], rtol=0, atol=0.02)
    assert (teacher[5.0, EMPTY] - teacher[1.0, EMPTY]).abs().mean() > 0.5  # guidance moves the samples far
    assert (teacher[5.0, 0.8] - teacher[5.0, EMPTY]).abs().mean() > 0.5  # and so does the negative prompt


# ----------------------------------------------------------------------------- distill.py and the student as a model
def distill_flags(teacher: Path, out: Path, *extra: str) -> list[str]:
    """A distillation of a tiny checkpoint by itself: one part of 256 four-step trajectories, 8-pair steps."""
    return [
        "--teacher", str(teacher), "--init", str(teacher), "--output_dir", str(out), "--trajectories", "256",
        "--teacher_steps", "4", "--batch_size", "8", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def student(tmp_path_factory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("fast")
    status, stderr = run_in_process("distill.py", distill_flags(checkpoint, out, "--train_steps", "4"), {}, ROOT)
    assert status == 0, stderr
    return out / "checkpoints" / "checkpoint_step_00000004.pt"


def test_the_student_is_a_checkpoint_that_names_its_teacher(student, checkpoint):
    saved = SavedModel.from_payload(load_checkpoint(student))
    assert saved.unet.distilled and saved.diffusion.prediction == "v"
    assert saved.distillation["teacher_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert saved.distillation["student_steps"] == (1, 2, 4) and saved.distillation["sampler"] == "ddim"


def test_the_student_samples_in_its_step_counts_with_per_image_seeds_and_a_callback(student):
    pipe = Text2Digit.from_checkpoint(student, "cpu")
    for steps in (1, 2, 4):
        calls = []
        request = make_request(["3", "a thick 7"], num_samples=3, steps=steps, seed=5)
        batched = pipe.generate(request, callback=lambda i, t, x_t, x0, calls=calls: calls.append(t))
        assert calls == list(landings(T, steps))  # one network call per step, on the student's grid
        one_by_one = pipe.generate(request, batch_size=1)
        assert batched.shape == (2, 3, 28, 28) and np.array_equal(batched, one_by_one)


LAYOUT = UNetConfig(widths=(16, 32), attention=(False, True), layers_per_block=1, head_dim=16)


def test_a_distilled_unet_reads_its_scale_landing_and_negative_prompt_and_only_it_takes_them():
    student = UNet(dataclasses.replace(LAYOUT, distilled=True, negative_input=True))
    plain = UNet(LAYOUT)
    torch.manual_seed(0)
    for p in student.parameters():  # no zero-initialised layer left, so every input shows in the output
        torch.nn.init.normal_(p, std=0.05)
    x, t, context = torch.randn(2, 1, 28, 28), torch.tensor([999, 999]), torch.randn(2, 8, 512)
    empty, thick = torch.randn(1, 8, 512), torch.randn(1, 8, 512)
    out = lambda w, s, negative=empty: student(
        x, t, context, guidance=torch.tensor([w, w]), lands_on=torch.tensor([s, s]), negative=negative
    )
    assert not torch.equal(out(2.0, 749), out(7.0, 749)) and not torch.equal(out(2.0, 749), out(2.0, CLEAN))
    assert not torch.equal(out(2.0, 749), out(2.0, 749, thick))
    torch.testing.assert_close(out(2.0, 749, thick), out(2.0, 749, thick.expand(2, -1, -1)))  # [1, L, D] broadcasts
    with pytest.raises(ValueError, match="a distilled UNet takes guidance and lands_on"):
        student(x, t, context)
    with pytest.raises(ValueError, match="a negative_input UNet takes negative"):
        student(x, t, context, guidance=torch.tensor([2.0, 2.0]), lands_on=torch.tensor([749, 749]))
    with pytest.raises(ValueError, match="only a distilled UNet does"):
        plain(x, t, context, guidance=torch.tensor([2.0, 2.0]), lands_on=torch.tensor([749, 749]))
    with pytest.raises(ValueError, match="only a distilled UNet takes a negative prompt"):
        UNet(dataclasses.replace(LAYOUT, negative_input=True))


def test_a_new_student_starts_as_the_model_it_is_initialised_from():
    """The scale, landing and negative-prompt inputs enter through zero-initialised layers: before training the
    student computes what its initial model computes, whatever they say."""
    torch.manual_seed(0)
    plain = UNet(LAYOUT)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    student = UNet(dataclasses.replace(LAYOUT, distilled=True, negative_input=True))
    missing, unexpected = student.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and {name.split(".")[0] for name in missing} == {"jump_mlp", "negative_mlp"}
    x, t, context = torch.randn(2, 1, 28, 28), torch.tensor([999, 499]), torch.randn(2, 8, 512)
    told = dict(guidance=torch.tensor([3.0, 6.0]), lands_on=torch.tensor([749, CLEAN]), negative=torch.randn(2, 8, 512))
    torch.testing.assert_close(student(x, t, context, **told), plain(x, t, context), rtol=0, atol=0)


def test_the_negative_prompts_distilled_name_no_digit_and_take_their_share():
    """A trajectory is guided away from a caption that names no digit ("thick", "fat broad leaning left") in
    ``negative_share`` of the draws, from the empty prompt otherwise; the captions and scales drawn are those
    drawn without negative prompts."""
    vocabulary = vocabulary_named("free-text-2")
    captions = caption_set(vocabulary)
    classes = torch.arange(NUM_DIGITS * len(vocabulary.styles)).repeat(4)
    rows, negatives, scales = draw_conditions(DistillConfig(negative_share=0.5), vocabulary, classes, part=3)
    said = [captions.prompts[row] for row in negatives.tolist() if row != captions.row_of(EMPTY_PROMPT)]
    assert 0.4 < len(said) / len(negatives) < 0.6 and len(set(said)) > 50
    assert all(named(prompt).digits == () and named(prompt).numbers == () for prompt in said)
    assert {"thick", "thin", "wide", "narrow", "slanted left"} <= {captions.prompts[r] for r in negative_rows(captions)}
    plain_rows, plain_negatives, plain_scales = draw_conditions(
        DistillConfig(negative_share=0.0), vocabulary, classes, part=3
    )
    assert torch.equal(rows, plain_rows) and torch.equal(scales, plain_scales) and not plain_negatives.any()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 20}, "--steps must be one of 1, 2, 4 for the distilled model"),
        ({"steps": 4, "guide_checkpoint": "STUDENT"}, "folds guidance in and takes no guide checkpoint;"),
    ],
)
def test_what_a_student_cannot_take_is_refused_in_one_line(student, values, message, tmp_path):
    out = tmp_path / "s.png"
    values = {key: str(student) if value == "STUDENT" else value for key, value in values.items()}
    argv = ["--checkpoint", str(student), "--prompt", "7", "--out", str(out)]
    argv += [word for key, value in values.items() for word in (f"--{key}", str(value))]
    status, stderr = run_in_process("sample.py", argv, {}, ROOT)
    assert status == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not out.exists()


def test_the_student_is_told_the_negative_prompt_and_an_older_student_refuses_one(student, tmp_path, monkeypatch):
    """The pipeline hands the student the tokens of the negative prompt (the empty prompt's without one); a
    student distilled before negative prompts were (no ``negative_input``) refuses one in one line."""
    pipe = Text2Digit.from_checkpoint(student, "cpu")
    told = []
    forward = pipe.model.net.forward
    monkeypatch.setattr(pipe.model.net, "forward", lambda *a, **kw: told.append(kw["negative"]) or forward(*a, **kw))
    for negative in ("thick", EMPTY_PROMPT):
        pipe("7", num_samples=2, steps=1, negative_prompt=negative)
        torch.testing.assert_close(told.pop(), pipe.model.encoder.encode([negative])[0], rtol=0, atol=1e-5)
    payload = load_checkpoint(student)
    payload["config"]["negative_input"] = False
    for weights in (payload["model"], payload["ema"]["weights"]):
        for name in [name for name in weights if name.startswith("negative_mlp.")]:
            del weights[name]
    torch.save(payload, tmp_path / "older.pt")
    older = Text2Digit.from_checkpoint(tmp_path / "older.pt", "cpu")
    assert not older.reads_negative_prompt and older("7", num_samples=1, steps=1).shape == (1, 1, 28, 28)
    with pytest.raises(InvalidRequest, match="was distilled without negative prompts and takes no negative_prompt"):
        older("7", num_samples=1, steps=1, negative_prompt="thick")


def test_the_options_a_student_overrides_are_named(student):
    pipe = Text2Digit.from_checkpoint(student, "cpu")
    warnings = pipe.check(make_request("7", steps=2, sampler="ddpm", guidance_scale=12))
    assert warnings == [
        "the distilled model samples its own way: sampler ignored",
        "guidance scale 12 is outside the [1, 8] distilled",
    ]


@pytest.mark.slow
def test_a_stopped_distillation_resumes_to_the_same_weights(checkpoint, tmp_path):
    """SIGTERM mid-training: a checkpoint and exit 75; --resume then ends bitwise where a straight run ends."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    steps = ["--train_steps", "60", "--checkpoint_every", "1000"]
    run = lambda out, *extra: subprocess.Popen(
        [sys.executable, "distill.py", *distill_flags(checkpoint, out, *steps, *extra)],
        cwd=ROOT, env=PROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    finish(run(straight), 0)
    proc = run(stopped)
    wait_for(lambda: list(stopped.glob("trajectories/part_*.pt")), proc, "the teacher's trajectories")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    finish(proc, 75)
    (partial,) = stopped.glob("checkpoints/checkpoint_step_*.pt")
    assert 0 < load_checkpoint(partial)["step"] < 60
    assert "resumed from" in finish(run(stopped, "--resume"), 0)
    ends = [load_checkpoint(out / "checkpoints" / "checkpoint_step_00000060.pt") for out in (straight, stopped)]
    assert state_bytes(ends[0]["ema"]) == state_bytes(ends[1]["ema"])


def test_a_resume_with_other_settings_is_refused(student, checkpoint, tmp_path):
    """Neither a checkpoint nor the teacher's trajectories are ever continued with other settings."""
    out = student.parent.parent
    status, stderr = run_in_process(
        "distill.py", [*distill_flags(checkpoint, out, "--seed", "1"), "--resume"], {}, ROOT
    )
    assert status == 2 and "was distilled with seed = 0, not 1" in stderr, stderr
    shutil.copytree(out / "trajectories", tmp_path / "trajectories")
    status, stderr = run_in_process("distill.py", distill_flags(checkpoint, tmp_path, "--seed", "1"), {}, ROOT)
    assert status == 2 and "holds trajectories drawn with seed = 0, not 1" in stderr, stderr


@pytest.mark.slow
def test_the_sampler_benchmark_adds_a_row_per_step_count_of_the_student(student, checkpoint):
    flags = ["--checkpoint", checkpoint, "--samplers", "ddim", "--steps", "2", "--num_images", 10, "--student", student]
    result = subprocess.run(
        [sys.executable, "-m", "bench.samplers", *map(str, flags), "--precision", "fp32"],
        cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| d")]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("ddim", 2)] + [
        (f"distilled ({student.name})", n) for n in (1, 2, 4)
    ]
    assert all(float(r[2]) > 0 and r[4].strip().endswith("%") for r in rows)


@pytest.mark.slow
def test_the_pipeline_benchmark_times_the_teacher_and_each_step_count_of_the_student(student, checkpoint):
    flags = ["--checkpoint", checkpoint, "--student", student, "--repeats", 1, "--threads", 1]
    result = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", *map(str, flags)],
        cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^100 digits through the pipeline, fp32, 1 threads, .*AVX.* CPU$", result.stdout, re.MULTILINE)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| checkpoint")]
    passes = 20 + 6  # 20 steps, the 6 with sigma > 2 guided: two passes each
    assert [(r[0].strip(), int(r[1])) for r in rows] == [(f"{checkpoint.name}, its defaults", passes)] + [
        (f"{student.name}, {n} steps", n) for n in (1, 2, 4)
    ]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher_steps", "10"], "--teacher_steps must be a multiple of 4, got 10"),
        (["--guidance_low", "5", "--guidance_high", "2"], "--guidance_low 5 exceeds --guidance_high 2"),
        (["--trajectories", "0"], "--trajectories must be at least 1, got 0"),
        (["--teacher", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    ],
)
def test_a_bad_distillation_is_refused_in_one_line_and_leaves_nothing(flags, message, tmp_path):
    out = tmp_path / "fast"
    status, stderr = run_in_process("distill.py", ["--output_dir", str(out), *flags], {}, ROOT)
    assert status == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not out.exists()


def test_a_shipped_student_keeps_its_record_and_samples_like_the_checkpoint(student, tmp_path):
    record = ship(student, None, "fast", folder=tmp_path)
    assert record["command"].startswith("python distill.py") and record["distillation"]["sampler"] == "ddim"
    shipped = Text2Digit.from_checkpoint(tmp_path / "fast.pt", "cpu")
    assert shipped.model.distillation == record["distillation"]
    assert shipped("7", steps=2, num_samples=2).shape == (1, 2, 28, 28)


def test_the_shipped_student_draws_the_prompted_digits_in_one_two_and_four_passes():
    pipe = Text2Digit.from_checkpoint(PRETRAINED_DIR / "fast.pt", "cpu")
    for steps in (1, 2, 4):
        images = pipe([str(d) for d in range(10)], num_samples=10, seed=0, steps=steps)
        logits, _ = judge_images(load_judge(), images.reshape(-1, 28, 28))
        assert (logits.argmax(1) == np.repeat(np.arange(10), 10)).mean() >= 0.95, steps
