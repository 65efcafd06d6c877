"""Noise schedules, computed in float64 as in improved-diffusion."""

from __future__ import annotations

import math

import torch


def cosine_beta_schedule(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Squared-cosine betas of Improved DDPM (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) and
    beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), clipped at ``max_beta`` so that the last
    step, where alpha_bar reaches 0, stays finite. diffusers calls it ``squaredcos_cap_v2``.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")

    def alpha_bar(t: float) -> float:
        return math.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)
