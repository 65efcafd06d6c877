"""Samplers for a trained noise predictor, k-diffusion style: plain functions, one signature.

    sampler(eps_fn, x_T, diffusion, steps, generator=None, spacing="trailing",
            threshold="none", callback=None, **options) -> x_0

``eps_fn(x_t, t)`` is any noise predictor (a guided UNet, or a closed form in the tests);
``t`` is an int64 tensor of shape [batch] holding training timesteps in [0, num_train_timesteps).
``x_T`` fixes the batch, dtype and device of the result. ``generator`` is one
``torch.Generator``, or a list with one per image so that an image's noise does not depend
on the batch it was drawn in. ``spacing`` picks the visited timesteps (:func:`sampling_timesteps`),
``threshold`` what is done to each x0 prediction (:func:`threshold_x0`), and
``callback(i, t, x_t, x0)``, if given, sees every step: its index i, the timestep t, the
state x_t fed to the network and the (thresholded) x0 prediction. Every sampler calls
``eps_fn`` exactly ``steps`` times. Schedule coefficients are taken from the float64 schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ddpm.diffusion import GaussianDiffusion

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None] | None
SPACINGS = ("trailing", "leading", "linspace")
THRESHOLDS = ("none", "clip", "dynamic")
DYNAMIC_PERCENTILE = 0.995  # Imagen's p (Saharia et al. 2022, section 2.3)


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The ``steps`` training timesteps a sampler visits, in descending order.

    - ``trailing`` (default): T - 1 - round(i T / steps), i.e. T - 1 down to T / steps - 1 in
      strides of T / steps, so the first step always starts from pure noise (Lin et al. 2024,
      "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
    - ``leading``: 0, T/steps, 2T/steps, ... as in DDIM's released code; never visits T - 1,
      so x_T ~ N(0, I) is treated as a less noisy x_t than it is.
    - ``linspace``: evenly spaced from T - 1 down to 0, rounded (Improved DDPM's respacing);
      its last network call is at t = 0, on almost clean data.
    Every sampler then takes one last step from the smallest of these to clean data (alpha_bar = 1).
    With steps == T every spacing gives T - 1, ..., 0.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if spacing == "trailing":
        ts = np.round(num_train_timesteps - np.arange(steps) * (num_train_timesteps / steps)) - 1
    elif spacing == "leading":
        ts = np.arange(steps)[::-1] * (num_train_timesteps // steps)
    elif spacing == "linspace":
        ts = np.round(np.linspace(num_train_timesteps - 1, 0, steps))
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


def threshold_x0(x0: torch.Tensor, mode: str, percentile: float = DYNAMIC_PERCENTILE) -> torch.Tensor:
    """Pull an x0 prediction back into the data range [-1, 1], for large guidance scales.

    - ``none``: unchanged.
    - ``clip``: clamp every pixel to [-1, 1] (static thresholding, Ho et al. 2020's code).
    - ``dynamic``: Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3): per image,
      s = max(the ``percentile`` quantile of |x0|, 1), then x0 = clamp(x0, -s, s) / s. Saturated
      pixels are pushed inwards instead of being flattened at the boundary.
    """
    if mode == "none":
        return x0
    if mode == "clip":
        return x0.clamp(-1, 1)
    if mode == "dynamic":
        s = torch.quantile(x0.abs().flatten(1).double(), percentile, dim=1).to(x0.dtype).clamp(min=1)
        s = s.reshape(-1, *[1] * (x0.ndim - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    raise ValueError(f"threshold must be one of {THRESHOLDS}, got {mode!r}")


def _denoiser(eps_fn: EpsFn, threshold: str, callback: Callback):
    """``denoise(i, x, t, alpha_bar_t) -> (eps, x0)``: one network call at step i, timestep t.

    x0 is thresholded, and eps then recomputed from it so that the pair stays consistent
    with x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (what every update below assumes).
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")

    def denoise(i: int, x: torch.Tensor, t: int, alpha_bar_t: float) -> tuple[torch.Tensor, torch.Tensor]:
        t_batch = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
        eps = eps_fn(x, t_batch).to(x.dtype)
        x0 = (x - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
        if threshold != "none":
            x0 = threshold_x0(x0, threshold)
            eps = (x - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
        if callback is not None:
            callback(i, t, x, x0)
        return eps, x0

    return denoise


def _schedule(diffusion: GaussianDiffusion, steps: int, spacing: str) -> list[tuple[int, int, float, float]]:
    """(t, s, alpha_bar_t, alpha_bar_s) for each step from t down to s < t; the last step ends at
    s = -1, clean data, with alpha_bar = 1."""
    ts = sampling_timesteps(diffusion.num_train_timesteps, steps, spacing)
    return [(t, s, diffusion.alpha_bar(t), diffusion.alpha_bar(s)) for t, s in zip(ts, ts[1:] + [-1])]


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    generator: Generator = None,
    spacing: str = "trailing",
    threshold: str = "none",
    callback: Callback = None,
) -> torch.Tensor:
    """Ancestral sampling, DDPM (Ho et al. 2020, Algorithm 2, sigma_t^2 = beta-tilde), respaced
    as in Improved DDPM (Nichol & Dhariwal 2021, section 4).

    Each step draws x_s ~ q(x_s | x_t, x0_hat), the posterior of the respaced chain
    (:meth:`GaussianDiffusion.q_posterior`). With steps == num_train_timesteps this is exactly DDPM's
    reverse process; the last step returns its mean, x0_hat, with no noise.
    """
    denoise = _denoiser(eps_fn, threshold, callback)
    x = x_T
    for i, (t, s, ab_t, _) in enumerate(_schedule(diffusion, steps, spacing)):
        _, x0 = denoise(i, x, t, ab_t)
        mean, variance = diffusion.q_posterior(x0, x, t, s)
        x = mean + math.sqrt(variance) * randn_like(x, generator) if s >= 0 else mean
    return x


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    generator: Generator = None,
    spacing: str = "trailing",
    threshold: str = "none",
    callback: Callback = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma from eq. 16).

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z, where
    sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s).
    eta = 0 is deterministic: a first-order step of the probability-flow ODE (DPM-Solver-1,
    Lu et al. 2022). With eta = 1, sigma^2 is the posterior variance and the step is the same
    Gaussian as :func:`sample_ddpm`'s.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    denoise = _denoiser(eps_fn, threshold, callback)
    x = x_T
    for i, (t, _, ab_t, ab_s) in enumerate(_schedule(diffusion, steps, spacing)):
        eps, x0 = denoise(i, x, t, ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    generator: Generator = None,
    spacing: str = "trailing",
    threshold: str = "none",
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order,
    in data-prediction form, which stays stable under large guidance scales.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma) and h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, where D = x0_t on the first step and
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h afterwards. The last step, to
    clean data (sigma = 0, lambda = inf), is first order and returns x0_t ("lower order final",
    as in the authors' code and k-diffusion). Prefer ``trailing`` spacing: ``linspace`` and
    ``leading`` end with a long step in lambda into t = 0 (sigma ~ 0.006) after shorter ones,
    and the small r there makes the second-order extrapolation overshoot at 5-10 steps.
    Deterministic: ``generator`` is accepted for the shared signature and unused.
    """
    return _dpmpp_2m(_denoiser(eps_fn, threshold, callback), x_T, diffusion, steps, spacing)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    generator: Generator = None,
    spacing: str = "trailing",
    threshold: str = "none",
    callback: Callback = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", section 5 and appendix): the same
    multistep data-prediction solver as :func:`sample_dpmpp_2m`, for the reverse SDE instead of the ODE.

    x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) D + sigma_s sqrt(1 - e^{-2h}) z, with
    D as in :func:`sample_dpmpp_2m` (midpoint form). Its first-order step (D = x0_t) is DDPM's
    posterior step exactly. The fresh noise at every step corrects the network's errors along the way
    (Karras et al. 2022, section 4), where the ODE carries them to the end; the last step returns x0_t.
    """
    denoise = _denoiser(eps_fn, threshold, callback)
    return _dpmpp_2m(denoise, x_T, diffusion, steps, spacing, noise=lambda x: randn_like(x, generator))


def _dpmpp_2m(
    denoise: Callable,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    spacing: str,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The multistep loop both DPM-Solver++(2M) samplers share: the ODE's step without ``noise``, the
    SDE's with it (``noise(x)``: standard normal noise shaped like x). h = lambda_s - lambda_t with
    lambda = log(alpha / sigma) = log(ab / (1 - ab)) / 2, and D = x0_t on the first step, then
    (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h."""
    x = x_T
    x0_prev, h_prev = None, None
    for i, (t, s, ab_t, ab_s) in enumerate(_schedule(diffusion, steps, spacing)):
        _, x0 = denoise(i, x, t, ab_t)
        if s < 0:
            break
        h = 0.5 * math.log(ab_s / (1 - ab_s)) - 0.5 * math.log(ab_t / (1 - ab_t))
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        if noise is None:
            x = math.sqrt((1 - ab_s) / (1 - ab_t)) * x - math.sqrt(ab_s) * math.expm1(-h) * d
        else:
            decay = -math.expm1(-2 * h)  # 1 - e^{-2h}
            x = math.sqrt((1 - ab_s) / (1 - ab_t)) * math.exp(-h) * x + math.sqrt(ab_s) * decay * d
            x = x + math.sqrt((1 - ab_s) * decay) * noise(x)
        x0_prev, h_prev = x0, h
    return x0


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
