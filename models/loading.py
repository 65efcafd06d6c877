"""Rebuild what a checkpoint needs for sampling: the UNet, the diffusion and the text encoder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ddpm import GaussianDiffusion, cosine_beta_schedule
from errors import UserError
from models.checkpoint import load_checkpoint
from models.text_encoder import TextEncoder, build_text_encoder, check_compatible
from models.unet import UNet, UNetConfig


# What a saved config meant by the keys it lacks: the UNet layout of the time before each key existed.
LAYOUT_BEFORE_KEYS = {"ff_mult": 4, "extra_up_block": True, "patch_size": 1}


def with_layout_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A saved training config with the layout keys it predates filled in (LAYOUT_BEFORE_KEYS)."""
    return {**LAYOUT_BEFORE_KEYS, **cfg}


def unet_from_config(cfg: Mapping[str, Any]) -> UNet:
    """The UNet described by a training config (a TrainConfig's fields, as a dict)."""
    cfg = with_layout_defaults(cfg)
    return UNet(UNetConfig(widths=tuple(cfg["widths"]), attention=tuple(cfg["attention"]),
                           layers_per_block=cfg["layers_per_block"], head_dim=cfg["head_dim"],
                           dropout=cfg["dropout"], ff_mult=cfg["ff_mult"], extra_up_block=cfg["extra_up_block"],
                           patch_size=cfg["patch_size"]))


def diffusion_from_config(cfg: Mapping[str, Any]) -> GaussianDiffusion:
    return GaussianDiffusion(cosine_beta_schedule(cfg["num_train_timesteps"]), prediction=cfg["prediction"])


def encoder_weights_flag(record: Mapping[str, Any]) -> tuple[str, int]:
    """(weights, seed) arguments that rebuild the text encoder a checkpoint recorded."""
    if record["weights"] == "file":
        return record["source"], 0
    if record["weights"] == "random":
        return "random", int(str(record["source"]).removeprefix("seed="))
    return record["weights"], 0


@dataclass
class TrainedModel:
    net: UNet  # the EMA weights, in eval mode
    diffusion: GaussianDiffusion
    encoder: TextEncoder
    config: dict[str, Any]
    path: Path
    epoch: int


def load_trained_model(path: Path, device: torch.device, text_encoder: str | None = None) -> TrainedModel:
    """Load a checkpoint's EMA UNet and the text encoder it was trained with.

    ``text_encoder`` overrides the recorded weights (e.g. a local file that moved); either way
    the encoder loaded must match the recorded fingerprint, or UserError is raised.
    """
    state = load_checkpoint(path, map_location=device)
    cfg = state["config"]
    weights, seed = encoder_weights_flag(state["text_encoder"])
    if text_encoder is not None:
        weights = text_encoder
    encoder = build_text_encoder(weights, seed=seed, device=device)
    check_compatible(state["text_encoder"], encoder.record)
    net = unet_from_config(cfg).to(device)
    try:
        net.load_state_dict(state["ema"]["weights"])
    except RuntimeError:  # shapes or names differ from what this code builds for that config
        raise UserError(f"checkpoint {path} holds weights of a different UNet than this version of "
                        "models/unet.py builds from its config; sample with the code that trained it or retrain") from None
    return TrainedModel(net.eval().requires_grad_(False), diffusion_from_config(cfg), encoder, cfg,
                        Path(path), state["epoch"])
