"""Samplers for a trained noise predictor, k-diffusion style: plain functions, one signature.

    sampler(eps_fn, x_T, diffusion, steps, generator=None, **options) -> x_0

``eps_fn(x_t, t)`` is any noise predictor (a guided UNet, or a closed form in the tests);
``t`` is an int64 tensor of shape [batch] holding training timesteps in [0, num_steps).
``x_T`` fixes the batch, dtype and device of the result. ``generator`` is one
``torch.Generator``, or a list with one per image so that an image's noise does not depend
on the batch it was drawn in. Schedule coefficients are taken from the float64 schedule.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ddpm.diffusion import GaussianDiffusion

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
SPACINGS = ("trailing", "leading", "linspace")


def sampling_timesteps(num_train_steps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The ``steps`` training timesteps a sampler visits, in descending order.

    - ``trailing`` (default): counts back from T - 1 in strides of T / steps, so the first
      step always starts from pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules
      and Sample Steps are Flawed", table 2).
    - ``leading``: 0, T/steps, 2T/steps, ... as in DDIM's released code; never visits T - 1.
    - ``linspace``: evenly spaced from T - 1 down to 0, rounded.
    With steps == T every spacing gives T - 1, ..., 0.
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(num_train_steps, 0, -num_train_steps / steps)) - 1
    elif spacing == "leading":
        ts = np.arange(steps)[::-1] * (num_train_steps // steps)
    elif spacing == "linspace":
        ts = np.round(np.linspace(num_train_steps - 1, 0, steps))
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return [int(t) for t in ts]


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, image i uses generator[i]."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(x):
            raise ValueError(f"got {len(generator)} generators for a batch of {len(x)}")
        draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.stack(draws).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _alpha_bar(diffusion: GaussianDiffusion, t: int) -> float:
    """alpha_bar_t as a float64 Python number; t = -1 stands for clean data (alpha_bar = 1)."""
    return 1.0 if t < 0 else float(diffusion.alphas_cumprod[t])


def _denoise(eps_fn: EpsFn, x: torch.Tensor, t: int, alpha_bar_t: float, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict (eps, x0) at timestep t; with ``clip_x0``, x0 is clipped to [-1, 1] and eps made consistent."""
    t_batch = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
    eps = eps_fn(x, t_batch).to(x.dtype)
    x0 = (x - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
    return eps, x0


def _pairs(diffusion: GaussianDiffusion, steps: int, spacing: str) -> list[tuple[int, int]]:
    """Consecutive (t, s) timestep pairs with s < t; the last pair ends at s = -1 (clean data)."""
    ts = sampling_timesteps(diffusion.num_steps, steps, spacing)
    return list(zip(ts, ts[1:] + [-1]))


@torch.no_grad()
def sample_ddpm(eps_fn: EpsFn, x_T: torch.Tensor, diffusion: GaussianDiffusion, steps: int,
                generator: Generator = None, spacing: str = "trailing", clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling, DDPM (Ho et al. 2020, Algorithm 2), respaced as in Improved DDPM.

    Each step draws x_s ~ q(x_s | x_t, x0_hat) with the posterior of the respaced chain:
    beta = 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal 2021, section 4). With
    steps == num_steps this is exactly DDPM's reverse process with variance beta-tilde.
    """
    x = x_T
    for t, s in _pairs(diffusion, steps, spacing):
        ab_t, ab_s = _alpha_bar(diffusion, t), _alpha_bar(diffusion, s)
        beta = 1 - ab_t / ab_s
        _, x0 = _denoise(eps_fn, x, t, ab_t, clip_x0)
        mean = (math.sqrt(ab_s) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_s) * x) / (1 - ab_t)
        variance = beta * (1 - ab_s) / (1 - ab_t)
        x = mean + math.sqrt(variance) * randn_like(x, generator) if s >= 0 else mean
    return x


@torch.no_grad()
def sample_ddim(eps_fn: EpsFn, x_T: torch.Tensor, diffusion: GaussianDiffusion, steps: int,
                generator: Generator = None, spacing: str = "trailing", clip_x0: bool = False,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma from eq. 16).

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z, where
    sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s).
    eta = 0 is deterministic; eta = 1 has the variance of ancestral DDPM.
    """
    x = x_T
    for t, s in _pairs(diffusion, steps, spacing):
        ab_t, ab_s = _alpha_bar(diffusion, t), _alpha_bar(diffusion, s)
        eps, x0 = _denoise(eps_fn, x, t, ab_t, clip_x0)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(eps_fn: EpsFn, x_T: torch.Tensor, diffusion: GaussianDiffusion, steps: int,
                    generator: Generator = None, spacing: str = "trailing", clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order,
    in data-prediction form, which stays stable under large guidance scales.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma) and h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, where D = x0_t on the first step and
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h afterwards. The last step, to
    clean data (sigma = 0, lambda = inf), returns the first-order estimate x0_t ("lower order
    final"). Deterministic: ``generator`` is accepted for the shared signature and unused.
    """
    x = x_T
    x0_prev, h_prev = None, None
    for t, s in _pairs(diffusion, steps, spacing):
        ab_t = _alpha_bar(diffusion, t)
        _, x0 = _denoise(eps_fn, x, t, ab_t, clip_x0)
        if s < 0:
            return x0
        ab_s = _alpha_bar(diffusion, s)
        lam_t = 0.5 * math.log(ab_t / (1 - ab_t))
        lam_s = 0.5 * math.log(ab_s / (1 - ab_s))
        h = lam_s - lam_t
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        x = math.sqrt((1 - ab_s) / (1 - ab_t)) * x - math.sqrt(ab_s) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}
