"""The training state a checkpoint holds, and whether a run may continue one (the format itself, its
versions and the part sampling reads live in models/checkpoint.py).

Besides model, EMA, optimizer and LR schedule, a checkpoint records where the data order stood
(the epoch and the batches done in it; the order itself is recomputed from (seed, epoch)), every
random state of every rank, the running loss sums of the epoch and the skipped steps. A run resumed
from it takes bitwise the same steps as a run that never stopped. ``TrainingState.state_dict``
writes every key and ``load_state_dict`` reads them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import VocabularyRecord, vocabulary_record
from models.ema import EMA
from models.unet import UNet
from runtime.errors import UserError
from training.config import TrainConfig, section_keys
from training.optimizer import build_optimizer
from training.rng import gather_rng, restore_rng
from training.stopping import NonFiniteGuard

RESUME_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "epoch_step",
    "steps_per_epoch",
    "step",
    "world_size",
    "loss_sums",
    "window_steps",
    "bad_steps",
)
# Config keys that fix the data order within an epoch: they must match to resume mid-epoch.
DATA_ORDER_KEYS = ("seed", "train_subset", "batch_size")


class LossMeter:
    """Running sums of the training loss on the device: over the epoch, and over the current logging
    window. Adding costs no host sync; reading a mean does."""

    def __init__(self, device: torch.device):
        self.epoch_sum = torch.zeros((), device=device)
        self.window_sum = torch.zeros((), device=device)
        self.window_steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.epoch_sum += loss
        self.window_sum += loss
        self.window_steps += 1

    def take_window_mean(self) -> float:
        """The mean loss of the window so far, which then starts afresh."""
        mean = self.window_sum.item() / self.window_steps
        self.window_sum.zero_()
        self.window_steps = 0
        return mean


class TrainingState:
    """Everything a checkpoint holds: the model, its EMA (rank 0 only), the optimizer and its schedule,
    this rank's training generator, the position in the data order, the epoch's loss sums and the
    skipped steps (``guard``).

    ``epoch`` and ``epoch_step`` say where training stands: ``epoch_step`` of ``steps_per_epoch``
    batches of ``epoch`` are done; ``step`` counts all steps so far.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        text_encoder: dict[str, Any] | None,
    ):
        self.cfg, self.rank, self.world_size, self.steps_per_epoch = cfg, rank, world_size, steps_per_epoch
        self.text_encoder = text_encoder
        torch.manual_seed(cfg.seed)  # the initial weights
        self.net = UNet(cfg.model).to(device, memory_format=memory_format(cfg))
        self.ema = EMA(self.net, cfg.ema_decay) if rank == 0 else None
        self.optimizer, self.scheduler = build_optimizer(
            self.net,
            cfg.learning_rate,
            cfg.weight_decay,
            cfg.warmup_steps,
            cfg.lr_schedule,
            total_steps=cfg.num_epochs * steps_per_epoch,
        )
        self.generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + rank)
        self.guard = NonFiniteGuard(cfg.max_bad_steps, device)
        self.losses = LossMeter(device)
        self.epoch, self.epoch_step, self.step = 1, 0, 0

    def begin_epoch(self, epoch: int) -> None:
        """Move on to ``epoch`` once the one before is done; a state loaded mid-epoch stays where it is."""
        if epoch != self.epoch:
            self.epoch, self.epoch_step = epoch, 0
            self.losses = LossMeter(self.losses.epoch_sum.device)

    @property
    def epoch_done(self) -> bool:
        return self.epoch_step == self.steps_per_epoch

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint's contents on rank 0 (what ``models.checkpoint.save_checkpoint`` writes), None on
        the others. A collective: every rank calls it (the random states of all ranks are gathered)."""
        rng = gather_rng(self.generator, self.world_size)
        if self.rank != 0:
            return None
        losses = self.losses
        return {
            "config": self.cfg.to_flat(),
            "text_encoder": self.text_encoder,
            "vocabulary": vocabulary_record(self.cfg.captions),
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "steps_per_epoch": self.steps_per_epoch,
            "step": self.step,
            "world_size": self.world_size,
            "loss_sums": torch.stack([losses.epoch_sum, losses.window_sum]).cpu(),
            "window_steps": losses.window_steps,
            "bad_steps": self.guard.skipped,
        }

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        """Continue from a checkpoint (checked by :func:`check_resumable`): at the next epoch if it
        ended one, else at the batch after the last one it holds."""
        self.net.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], self.rank, self.world_size, self.generator)
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"])
        self.step, self.guard.skipped = payload["step"], payload["bad_steps"]
        if payload["epoch_step"] == payload["steps_per_epoch"]:
            self.epoch, self.epoch_step = payload["epoch"] + 1, 0
            return
        self.epoch, self.epoch_step = payload["epoch"], payload["epoch_step"]
        epoch_sum, window_sum = (s.to(self.losses.epoch_sum.device) for s in payload["loss_sums"])
        self.losses.epoch_sum, self.losses.window_sum = epoch_sum, window_sum
        self.losses.window_steps = payload["window_steps"]


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def check_resumable(payload: Mapping[str, Any], cfg: TrainConfig, world_size: int, path: Path) -> None:
    """Raise UserError unless this run (``cfg``, ``world_size``) can continue the checkpoint ``payload``."""
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise UserError(
            f"{path} cannot be resumed: it lacks {', '.join(missing)} (an older train.py wrote it); "
            "start fresh, or only sample from it"
        )
    now = cfg.to_flat()
    _require_same(
        path,
        payload["config"],
        now,
        section_keys("model", "diffusion") + ("captions",),  # what the weights mean, and what they were taught
        "the config it was trained with (same --config)",
    )
    saved_vocabulary, vocabulary = (
        VocabularyRecord(**payload["vocabulary"]),
        VocabularyRecord(**vocabulary_record(cfg.captions)),
    )
    if saved_vocabulary != vocabulary:
        raise UserError(
            f"{path} was trained on the caption vocabulary {saved_vocabulary} but this run's is {vocabulary}; "
            "resume with the code that trained it, or start fresh"
        )
    if payload["epoch_step"] < payload["steps_per_epoch"]:
        saved = {**payload["config"], "world_size": payload["world_size"]}
        _require_same(
            path,
            saved,
            {**now, "world_size": world_size},
            DATA_ORDER_KEYS + ("world_size",),
            "the same values (they fix the data order within an epoch), or an epoch-end checkpoint",
        )


def _require_same(path: Path, saved: Mapping, now: Mapping, keys: tuple[str, ...], fix: str) -> None:
    for key in keys:
        if saved[key] != now[key]:
            raise UserError(
                f"{path} was written with {key}={saved[key]!r} but this run has {key}={now[key]!r}; resume with {fix}"
            )
