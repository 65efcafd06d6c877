"""Rebuild what sampling needs from a checkpoint: the EMA UNet, the diffusion and the text encoder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.captions import Vocabulary, vocabulary_named
from ddpm import GaussianDiffusion
from models.checkpoint import SavedModel, load_checkpoint
from models.text_encoder import TextEncoder, build_text_encoder, check_compatible
from models.unet import UNet
from runtime.errors import UserError


def encoder_weights_flag(record: Mapping[str, Any]) -> tuple[str, int]:
    """(weights, seed) arguments that rebuild the text encoder a checkpoint recorded."""
    if record["weights"] == "file":
        return record["source"], 0
    if record["weights"] == "random":
        return "random", record["seed"]
    return record["weights"], 0


@dataclass
class TrainedModel:
    net: UNet  # the EMA weights, in eval mode
    diffusion: GaussianDiffusion
    encoder: TextEncoder
    saved: SavedModel  # what the checkpoint says of the model
    path: Path

    @property
    def epoch(self) -> int:
        return self.saved.epoch

    @property
    def distillation(self) -> dict | None:
        """How a distilled student was made (distill.py); None for a diffusion model."""
        return self.saved.distillation

    @property
    def vocabulary(self) -> Vocabulary:
        """The caption vocabulary it was trained on (checked against its fingerprint when loaded)."""
        return vocabulary_named(self.saved.vocabulary.name)


def load_trained_model(path: Path, device: torch.device, text_encoder: str | None = None) -> TrainedModel:
    """Load a checkpoint's EMA UNet and the text encoder it was trained with.

    ``text_encoder`` overrides the recorded weights (e.g. a local file that moved); either way
    the encoder loaded must match the recorded fingerprint, and this code's caption vocabulary of
    the recorded name must be the one it was trained on, or UserError is raised.
    """
    saved = SavedModel.from_payload(load_checkpoint(path, map_location=device))
    saved.vocabulary.check_current(Path(path))
    weights, seed = encoder_weights_flag(saved.text_encoder)
    encoder = build_text_encoder(text_encoder or weights, seed=seed, device=device)
    check_compatible(saved.text_encoder, encoder.record)
    net = UNet(saved.unet).to(device)
    try:
        net.load_state_dict(saved.ema_weights)
    except RuntimeError:  # shapes or names differ from what this code builds for that config
        raise UserError(
            f"checkpoint {path} holds weights of a different UNet than this version of "
            "models/unet.py builds from its config; sample with the code that trained it or retrain"
        ) from None
    return TrainedModel(
        net.eval().requires_grad_(False),
        GaussianDiffusion.from_config(saved.diffusion),
        encoder,
        saved,
        Path(path),
    )
