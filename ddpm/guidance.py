"""Classifier-free guidance (Ho & Salimans 2022): a wrapper that turns a conditional
network into the guided ``eps_fn`` every sampler takes, with two refinements of it:

- a guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
  sample and distribution quality"): guide only at middle noise levels, sigma_t in (lo, hi], where
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). At high noise guidance drives every sample of a
  prompt towards the same few shapes; at low noise it only sharpens. Outside the interval the
  conditional network alone runs: one forward pass instead of two.
- guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  section 3.4): the guided x0 prediction is scaled back to the conditional one's per-image standard
  deviation, x0 = phi * x0_cfg * std(x0_cond) / std(x0_cfg) + (1 - phi) * x0_cfg, against the
  over-exposure (bold, blown-out strokes) of large scales.
- adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
  Guidance Scales in Diffusion Models", section 4): in x0 space the guided prediction is
  x0_cond + (s - 1) * delta, delta = x0_cond - x0_uncond. The part of delta parallel to x0_cond
  (per image) mostly scales the image up, which over-saturates; the orthogonal part carries the
  prompt. APG keeps delta_orth + eta * delta_par: eta = 1 is plain guidance, eta = 0 drops the
  parallel part. (Their momentum and norm threshold are left out.)
- autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the
  guiding prediction comes from a worse model of the same data (smaller, or trained for less long)
  given the same prompt, instead of the model itself given the empty prompt:
  eps = eps_guide + s * (eps - eps_guide). Its errors resemble the model's own, so guidance moves
  the image away from them rather than towards a caricature of the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ddpm.diffusion import GaussianDiffusion

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    net: NetFn,
    diffusion: GaussianDiffusion,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float | torch.Tensor,
    interval: tuple[float, float] | None = None,
    rescale: float = 0.0,
    parallel: float = 1.0,
    guide: NetFn | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps = eps_uncond + scale * (eps_cond - eps_uncond), both halves in one batched call.

    ``net(x, t, context)`` returns the network output of ``diffusion.prediction`` type;
    ``cond`` is [B, L, D] and ``uncond`` [B, L, D] or [1, L, D] (the empty or negative prompt).
    ``scale`` = 1 is plain conditional sampling (one forward pass, no unconditional half); a tensor
    [B, 1, 1, 1] gives each image its own scale (distill.py's teacher).
    ``interval`` (sigma_lo, sigma_hi) limits guidance to those noise levels; ``rescale`` is phi above;
    ``parallel`` is APG's eta; ``guide`` a worse network for autoguidance, given ``cond`` (``uncond``
    unused).
    The samplers call ``eps_fn`` with one timestep for the whole batch.
    """

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion.to_eps(x, t, net(x, t, cond))

    if not torch.is_tensor(scale) and scale == 1.0:
        return conditional
    context = torch.cat([cond, uncond.expand_as(cond)])

    def _both(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps of the model on the prompt, eps of what guides it): two networks, or one batched call."""
        if guide is not None:
            return conditional(x, t).float(), diffusion.to_eps(x, t, guide(x, t, cond)).float()
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        return diffusion.to_eps(x2, t2, net(x2, t2, context)).float().chunk(2)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = float(diffusion.alphas_cumprod[t[0]])
        if interval is not None and not interval[0] < math.sqrt((1 - ab) / ab) <= interval[1]:
            return conditional(x, t)
        eps_cond, eps_uncond = _both(x, t)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        if parallel != 1.0:
            eps = _projected(x, ab, eps_cond, eps_uncond, scale, parallel)
        return _rescaled(x, ab, eps, eps_cond, rescale) if rescale else eps

    return eps_fn


def _projected(
    x: torch.Tensor, ab: float, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, eta: float
) -> torch.Tensor:
    """The eps of APG's x0 = x0_cond + (scale - 1) * (delta_orth + eta * delta_par) (see the module docstring)."""
    x0_cond = _x0_of(x, ab, eps_cond)
    delta = x0_cond - _x0_of(x, ab, eps_uncond)
    dims = tuple(range(1, x.ndim))
    along = (delta * x0_cond).sum(dims, keepdim=True) / x0_cond.square().sum(dims, keepdim=True).clamp_min(1e-12)
    delta_par = along * x0_cond
    x0 = x0_cond + (scale - 1) * (delta - delta_par + eta * delta_par)
    return _eps_of(x, ab, x0)


def _rescaled(x: torch.Tensor, ab: float, eps: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """The guided eps whose x0 prediction is rescaled towards the conditional one's per-image std."""
    x0, x0_cond = _x0_of(x, ab, eps), _x0_of(x, ab, eps_cond)
    dims = tuple(range(1, x.ndim))
    ratio = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp_min(1e-8)
    x0 = phi * x0 * ratio + (1 - phi) * x0
    return _eps_of(x, ab, x0)


def _x0_of(x: torch.Tensor, ab: float, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar) (Ho et al. 2020, eq. 15)."""
    return (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


def _eps_of(x: torch.Tensor, ab: float, x0: torch.Tensor) -> torch.Tensor:
    """The eps that predicts ``x0`` from x_t: the inverse of :func:`_x0_of`."""
    return (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
