"""Classifier-free guidance (Ho & Salimans 2022): a wrapper that turns a conditional
network into the guided ``eps_fn`` every sampler takes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddpm.diffusion import GaussianDiffusion

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    net: NetFn, diffusion: GaussianDiffusion, cond: torch.Tensor, uncond: torch.Tensor, scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps = eps_uncond + scale * (eps_cond - eps_uncond), both halves in one batched call.

    ``net(x, t, context)`` returns the network output of ``diffusion.prediction`` type;
    ``cond`` is [B, L, D] and ``uncond`` [B, L, D] or [1, L, D] (the empty or negative prompt).
    ``scale`` = 1 is plain conditional sampling (one forward pass, no unconditional half).
    """
    if scale == 1.0:
        return lambda x, t: diffusion.to_eps(x, t, net(x, t, cond))
    context = torch.cat([cond, uncond.expand_as(cond)])

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        eps_cond, eps_uncond = diffusion.to_eps(x2, t2, net(x2, t2, context)).float().chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn
