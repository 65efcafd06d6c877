"""Distilling a guided teacher into a few-step student (the math: ddpm/distillation.py).

Two stages, each resumable, both in one output folder:

1. ``trajectories/part_PPPP.pt``: the teacher's guided probability-flow ODE (DPM-Solver++(2M),
   ``teacher_steps`` trailing steps), solved from seeded noise for captions drawn as training draws
   them, guidance scales drawn uniformly from [guidance_low, guidance_high] and, in ``negative_share``
   of them, a negative prompt (a caption that names no digit) guiding away in place of the empty
   prompt; each part keeps the
   states where the student's steps start and the clean endpoint. A part is written atomically, and a
   resumed run keeps the parts already written.
2. ``checkpoints/checkpoint_step_SSSSSSSS.pt``: the student, a UNet with ``distilled`` and ``negative_input``
   inputs started from ``init`` (a smaller model of the same data and text encoder, or an earlier student:
   its weights, v-prediction), trained
   on random (trajectory, jump) pairs with ``distillation_loss``; the EMA weights sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.captions import EMPTY_PROMPT, CaptionSet, CaptionTensors, Vocabulary, caption_set, prompt_table
from data.mnist import load_mnist, mnist_cache_dir
from data.prompts import Named, named
from data.shapes import IMAGE_SHAPE
from ddpm import DEFAULT_SAMPLING, DiffusionConfig, GaussianDiffusion, classifier_free_guidance, image_generator
from ddpm.distillation import (
    CLEAN,
    STUDENT_SAMPLING,
    STUDENT_SPACING,
    distillation_loss,
    stops,
    student_jumps,
    teacher_trajectory,
)
from ddpm.options import check, option, to_json
from ddpm.samplers import sample_dpmpp_2m
from models.checkpoint import PRETRAINED_DIR, ROOT, TEACHER, save_checkpoint, step_checkpoint_path
from models.ema import EMA
from models.loading import TrainedModel
from models.text_encoder import check_compatible
from models.unet import UNet
from runtime.errors import EXIT_RESUMABLE, UserError
from runtime.files import atomic_write
from training.checkpoints import prune_checkpoints
from training.data import caption_classes
from training.optimizer import build_optimizer

PART_SIZE = 256  # trajectories per file, and per batch of the teacher
STUDENT_STEPS = (1, 2, 4)  # the step counts a student samples in: its grids lie on a trailing teacher's of 4k steps
RESUMABLE_CHANGES = ("train_steps", "checkpoint_every", "output_dir")  # settings a resumed run may change


@dataclass(frozen=True)
class DistillConfig:
    """Every knob of distill.py, declared once (its flags are made from these fields)."""

    teacher: Path = option(TEACHER, help="the guided model to distil")
    init: Path = option(
        PRETRAINED_DIR / "cpu.pt",
        help="the checkpoint whose layout and weights the student starts from: a smaller model of the same data",
    )
    output_dir: Path = option(Path("outputs/fast"), help="where trajectories and checkpoints go")
    trajectories: int = option(8192, help="teacher trajectories to distil from", low=1)
    teacher_steps: int = option(
        20,
        help="the teacher's DPM-Solver++(2M) steps per trajectory: a multiple of 4, so that it visits the "
        "student's timesteps",
        low=4,
    )
    guidance_low: float = option(1.0, help="the smallest guidance scale distilled", low=0, high=30)
    guidance_high: float = option(8.0, help="the largest guidance scale distilled", low=0, high=30)
    negative_share: float = option(
        0.5,
        help="the share of trajectories guided away from a negative prompt (a caption that names no digit) "
        "instead of the empty prompt",
        low=0,
        high=1,
    )
    train_steps: int = option(6000, help="student optimiser steps", low=1)
    batch_size: int = option(128, help="(trajectory, jump) pairs per step", low=1)
    learning_rate: float = option(1e-3, help="AdamW's peak learning rate", low=0)
    warmup_steps: int = option(100, help="learning-rate warm-up steps", low=0)
    ema_decay: float = option(0.995, help="decay of the EMA weights that sample", low=0, high=1)
    checkpoint_every: int = option(250, help="steps between checkpoints", low=1)
    seed: int = option(0, help="seeds the noise, captions and scales of the trajectories, and the training order")

    def __post_init__(self) -> None:
        check(self)
        if self.teacher_steps % max(STUDENT_STEPS):
            raise UserError(f"--teacher_steps must be a multiple of {max(STUDENT_STEPS)}, got {self.teacher_steps}")
        if self.guidance_low > self.guidance_high:
            raise UserError(f"--guidance_low {self.guidance_low:g} exceeds --guidance_high {self.guidance_high:g}")

    def record(self) -> dict[str, Any]:
        """The settings as a checkpoint records them (paths inside the repository relative to it), and the
        step counts the student samples in."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: _relative(v) if isinstance(v, Path) else v for name, v in fields.items()} | {
            "student_steps": STUDENT_STEPS
        }


def _relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- stage 1: the teacher's trajectories
@dataclass(frozen=True)
class Trajectories:
    """What the teacher drew: per trajectory, the states at ``stops`` then the endpoint, its caption, negative
    prompt and scale."""

    stops: list[int]
    states: torch.Tensor  # float32 [N, len(stops) + 1, 1, 28, 28]
    rows: torch.Tensor  # int64 [N]: rows of the prompt table
    negative_rows: torch.Tensor  # int64 [N]: rows of the prompt table (0, the empty prompt: plain guidance)
    guidance: torch.Tensor  # float32 [N]


def negative_rows(captions: CaptionSet) -> torch.Tensor:
    """The rows of the training captions that name no digit ("thick", "fat broad leaning left"): what a
    negative prompt says."""
    nothing = Named(digits=(), numbers=())
    return torch.tensor([row for row, p in enumerate(captions.prompts) if p != EMPTY_PROMPT and named(p) == nothing])


def draw_conditions(
    cfg: DistillConfig, vocabulary: Vocabulary, classes: torch.Tensor, part: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(caption rows, negative prompt rows, guidance scales) of part ``part``: the caption of a random training
    image (of caption class ``classes``), drawn as training draws them; with probability ``negative_share`` a
    caption that names no digit as the negative prompt, else the empty prompt; a scale uniform in
    [guidance_low, guidance_high]."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, part]).generate_state(1)[0]))
    images = torch.randint(len(classes), (PART_SIZE,), generator=gen)
    captions = caption_set(vocabulary)
    rows = captions.draw(classes[images], gen, CaptionTensors.of(captions, torch.device("cpu")))
    scales = cfg.guidance_low + (cfg.guidance_high - cfg.guidance_low) * torch.rand(PART_SIZE, generator=gen)
    styles = negative_rows(captions)
    negatives = styles[torch.randint(len(styles), (PART_SIZE,), generator=gen)]
    negatives[torch.rand(PART_SIZE, generator=gen) >= cfg.negative_share] = captions.row_of(EMPTY_PROMPT)
    return rows, negatives, scales


def teacher_part(
    cfg: DistillConfig,
    teacher: TrainedModel,
    table: torch.Tensor,
    conditions: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    part: int,
    bf16: bool,
) -> dict:
    """Trajectories PART_SIZE * part ... of the run: image i starts from ``image_generator(seed, i)``."""
    rows, negatives, scales = conditions
    first = part * PART_SIZE
    x_T = torch.stack(
        [torch.randn(*IMAGE_SHAPE, generator=image_generator(cfg.seed, first + i)) for i in range(PART_SIZE)]
    )
    eps_fn = classifier_free_guidance(
        teacher.net,
        teacher.diffusion,
        table[rows],
        table[negatives],
        scales[:, None, None, None],
        DEFAULT_SAMPLING.guidance_interval,
    )
    keep = stops(teacher.diffusion.num_train_timesteps, STUDENT_STEPS)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        states = teacher_trajectory(
            sample_dpmpp_2m,
            eps_fn,
            x_T,
            teacher.diffusion,
            cfg.teacher_steps,
            keep,
            spacing=STUDENT_SPACING,  # the teacher's grid holds the student's
            threshold="clip",
        )
    return {"stops": keep, "states": states.float(), "rows": rows, "negative_rows": negatives, "guidance": scales}


def make_trajectories(
    cfg: DistillConfig, teacher: TrainedModel, table: torch.Tensor, bf16: bool, stop_requested=lambda: False
) -> Trajectories:
    """Every part of stage 1, those already on disk read back, the others drawn and written; SystemExit
    with EXIT_RESUMABLE after a part when ``stop_requested()``."""
    folder = cfg.output_dir / "trajectories"
    check_trajectory_settings(cfg, folder)
    parts = -(-cfg.trajectories // PART_SIZE)
    classes = None  # the training images' caption classes, read only when a part is still to be drawn
    loaded = []
    for part in range(parts):
        path = folder / f"part_{part:04d}.pt"
        if not path.is_file():
            start = time.perf_counter()
            if classes is None:
                mnist = load_mnist()
                classes = caption_classes(teacher.vocabulary, mnist.train_images, mnist.train_labels)
                classes = torch.from_numpy(classes)
            conditions = draw_conditions(cfg, teacher.vocabulary, classes, part)
            payload = teacher_part(cfg, teacher, table, conditions, part, bf16)
            atomic_write(path, lambda f, payload=payload: torch.save(payload, f))
            done = (part + 1) * PART_SIZE
            print(
                f"teacher: {done}/{parts * PART_SIZE} trajectories ({time.perf_counter() - start:.1f} s for this part)"
            )
            if stop_requested():
                raise SystemExit(EXIT_RESUMABLE)
        loaded.append(torch.load(path, weights_only=True))
    return Trajectories(
        loaded[0]["stops"],
        *(torch.cat([p[key] for p in loaded]) for key in ("states", "rows", "negative_rows", "guidance")),
    )


TRAJECTORY_SETTINGS = (
    "teacher", "teacher_steps", "student_steps", "guidance_low", "guidance_high", "negative_share", "seed"
)  # fmt: skip


def check_trajectory_settings(cfg: DistillConfig, folder: Path) -> None:
    """Record what the parts in ``folder`` are drawn with (``settings.json``, with the teacher's sha256), or
    raise UserError if they were drawn otherwise: parts of another teacher or seed are never mixed."""
    record = cfg.record()
    settings = {key: record[key] for key in TRAJECTORY_SETTINGS} | {"teacher_sha256": sha256_of(cfg.teacher)}
    settings["student_steps"] = list(settings["student_steps"])
    path = folder / "settings.json"
    if not path.is_file():
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))
        return
    recorded = json.loads(path.read_text())
    differ = [key for key in settings if recorded.get(key) != settings[key]]
    if differ:
        key = differ[0]
        raise UserError(
            f"{folder} holds trajectories drawn with {key} = {recorded.get(key)}, not {settings[key]}; "
            "pick another --output_dir, or delete that folder to draw them again"
        )


def prompt_tokens(teacher: TrainedModel) -> torch.Tensor:
    """The text tokens of every training caption of the teacher's vocabulary (training's cached table)."""
    captions = caption_set(teacher.vocabulary)
    encode = lambda prompts: teacher.encoder.encode(prompts)[0]
    return prompt_table(captions, encode, [*teacher.encoder.record["fingerprint"], "cpu"], mnist_cache_dir())


# ----------------------------------------------------------------------------- stage 2: the student
def build_student(init: TrainedModel, teacher: TrainedModel) -> UNet:
    """``init``'s UNet with the distilled inputs (zero-initialised: it starts as ``init``), or UserError when
    ``init`` reads other text features or another schedule than the teacher."""
    check_compatible(teacher.saved.text_encoder, init.encoder.record)
    if init.saved.diffusion.num_train_timesteps != teacher.saved.diffusion.num_train_timesteps:
        raise UserError(f"--init {init.path} has another number of timesteps than --teacher {teacher.path}")
    net = UNet(dataclasses.replace(init.saved.unet, distilled=True, negative_input=True))
    missing, unexpected = net.load_state_dict(init.saved.ema_weights, strict=False)
    new = ("jump_mlp.", "negative_mlp.")
    assert not unexpected and all(name.startswith(new) for name in missing), (missing, unexpected)
    return net


class StudentTraining:
    """The student, its EMA, optimiser and schedule, the random stream that picks its batches, and the step."""

    def __init__(self, cfg: DistillConfig, teacher: TrainedModel, init: TrainedModel, bf16: bool):
        self.cfg, self.teacher, self.bf16 = cfg, teacher, bf16
        self.net = build_student(init, teacher).train()
        self.diffusion = GaussianDiffusion.from_config(dataclasses.replace(teacher.saved.diffusion, prediction="v"))
        self.ema = EMA(self.net, cfg.ema_decay)
        self.optimizer, self.scheduler = build_optimizer(
            self.net, cfg.learning_rate, 0.0, cfg.warmup_steps, "cosine", cfg.train_steps
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        jumps = student_jumps(self.diffusion.num_train_timesteps, STUDENT_STEPS)
        self.jumps = torch.tensor(jumps)  # [J, 2]: (t, s)
        self.record = {
            **cfg.record(),
            "teacher_sha256": sha256_of(cfg.teacher),
            "init_sha256": sha256_of(cfg.init),
            "sampler": STUDENT_SAMPLING["sampler"],
            "spacing": STUDENT_SPACING,
            "guidance_interval_of_teacher": list(to_json(DEFAULT_SAMPLING.guidance_interval)),  # inf as null
        }
        self.config = {
            **init.saved.config,
            **dataclasses.asdict(self.net.cfg),
            **dataclasses.asdict(DiffusionConfig(teacher.saved.diffusion.num_train_timesteps, "v")),
            "captions": teacher.saved.vocabulary.name,
        }

    def train(self, data: Trajectories, table: torch.Tensor, stop_requested) -> Path:
        """Steps until ``train_steps`` (checkpointing every ``checkpoint_every`` and at the end), or until
        ``stop_requested()`` says so after a step (a checkpoint, then SystemExit with EXIT_RESUMABLE).
        Returns the last checkpoint."""
        last = None
        where = {t: i for i, t in enumerate(data.stops)} | {CLEAN: len(data.stops)}
        positions = torch.tensor([[where[t], where[s]] for t, s in self.jumps.tolist()])  # of x_t, x_s in states
        start, images = time.perf_counter(), 0
        while self.step < self.cfg.train_steps:
            loss = self._step(data, table, positions)
            self.step += 1
            images += self.cfg.batch_size
            if self.step % 50 == 0 or self.step == self.cfg.train_steps:
                rate = images / (time.perf_counter() - start)
                print(f"step {self.step}/{self.cfg.train_steps}  loss {loss:.4f}  {rate:.0f} pairs/s", flush=True)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.train_steps:
                last = self.save()
            if stop_requested():
                self.save()
                raise SystemExit(EXIT_RESUMABLE)
        return last or self.save()

    def _step(self, data: Trajectories, table: torch.Tensor, positions: torch.Tensor) -> float:
        """One optimiser step on random (trajectory, jump) pairs; ``positions`` [J, 2] are where each jump's
        x_t and x_s lie in ``data.states``."""
        pick = torch.randint(len(data.rows), (self.cfg.batch_size,), generator=self.generator)
        jump = torch.randint(len(self.jumps), (self.cfg.batch_size,), generator=self.generator)
        (t, s), (at_t, at_s) = self.jumps[jump].T, positions[jump].T
        x_t, x_s = data.states[pick, at_t], data.states[pick, at_s]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            context, negative = table[data.rows[pick]], table[data.negative_rows[pick]]
            loss = distillation_loss(self.net, self.diffusion, x_t, x_s, t, s, context, data.guidance[pick], negative)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net)
        return float(loss.detach())

    def save(self) -> Path:
        path = step_checkpoint_path(self.cfg.output_dir, self.step)
        payload = {
            "config": self.config,
            "ema": self.ema.state_dict(),
            "text_encoder": self.teacher.saved.text_encoder,
            "vocabulary": dataclasses.asdict(self.teacher.saved.vocabulary),
            "epoch": 1,
            "step": self.step,
            "epoch_step": self.step,
            "steps_per_epoch": self.cfg.train_steps,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.generator.get_state(),
            "distillation": self.record,
        }
        save_checkpoint(payload, path)
        prune_checkpoints(self.cfg.output_dir, keep_last=2)
        return path

    def load(self, payload: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint of the same distillation (UserError if its settings differ)."""
        recorded = payload.get("distillation")
        if recorded is None:
            raise UserError(f"--resume: {path} is not a checkpoint of distill.py")
        differ = [key for key in self.record if recorded.get(key) != self.record[key] and key not in RESUMABLE_CHANGES]
        if differ:
            raise UserError(
                f"--resume: {path} was distilled with {differ[0]} = {recorded.get(differ[0])}, not "
                f"{self.record[differ[0]]}; use the same settings, or a new --output_dir"
            )
        self.net.load_state_dict(payload["model"])
        self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.generator.set_state(payload["rng"])
        self.step = payload["step"]
