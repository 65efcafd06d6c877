"""The DDPM forward process and its posterior (Ho et al. 2020), named as in the paper.

Every schedule quantity is kept in float64 and cast to the data's dtype only when it is
applied, so a bf16 or fp32 model never sees rounding in alpha_bar near t = T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ddpm.schedule import cosine_beta_schedule

PREDICTIONS = ("eps", "v")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion a model is trained for: the number of timesteps T of the cosine schedule, and
    what the network predicts. Both fix the meaning of a model's weights."""

    num_train_timesteps: int = 1000
    prediction: str = field(default="eps", metadata={"choices": PREDICTIONS})


class GaussianDiffusion:
    """Schedule arithmetic for a discrete-time DDPM with ``num_train_timesteps = len(betas)`` steps.

    ``prediction`` is what the network outputs: ``"eps"`` (the noise, as in DDPM) or ``"v"``
    (v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0, Salimans & Ho 2022). Samplers only
    ever see eps: :meth:`to_eps` converts the network output.
    """

    def __init__(self, betas: torch.Tensor, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.prediction = prediction
        self.num_train_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # ln sigma_t, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): increasing in t (sample_timesteps' table)
        self.log_sigmas = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        """The squared-cosine schedule (Nichol & Dhariwal 2021) of ``cfg.num_train_timesteps`` steps."""
        return cls(cosine_beta_schedule(cfg.num_train_timesteps), prediction=cfg.prediction)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] reshaped to broadcast over ``like`` ([B, ...]) and cast to its dtype."""
        out = values.to(t.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), DDPM eq. 4."""
        ab = self.alphas_cumprod
        return self._at(ab.sqrt(), t, x0) * x0 + self._at((1 - ab).sqrt(), t, x0) * noise

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a float64 Python number; t = -1 stands for clean data (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: int, s: int) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_s | x_t, x_0) for timesteps t > s (s = -1: clean data), the whole batch at t.

        DDPM eq. 6-7 for the chain that jumps from s to t, whose one step has beta = 1 - alpha_bar_t /
        alpha_bar_s (respacing, Nichol & Dhariwal 2021 section 4): mean = (sqrt(alpha_bar_s) beta x_0 +
        sqrt(1 - beta) (1 - alpha_bar_s) x_t) / (1 - alpha_bar_t), variance = beta (1 - alpha_bar_s) /
        (1 - alpha_bar_t). With s = t - 1 it is eq. 6-7 itself; with s = -1 it is x_0, variance 0.
        """
        if not t > s >= -1:
            raise ValueError(f"the posterior needs timesteps t > s >= -1, got t={t}, s={s}")
        ab_t, ab_s = self.alpha_bar(t), self.alpha_bar(s)
        beta = 1 - ab_t / ab_s
        mean = (math.sqrt(ab_s) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_s) * x_t) / (1 - ab_t)
        return mean, beta * (1 - ab_s) / (1 - ab_t)

    def to_eps(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The noise implied by a network ``output`` of this diffusion's prediction type."""
        if self.prediction == "eps":
            return output
        ab = self.alphas_cumprod
        return self._at(ab.sqrt(), t, x_t) * output + self._at((1 - ab).sqrt(), t, x_t) * x_t

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator,
        device: torch.device,
        log_sigma: tuple[float, float] | None = None,
        uniform_share: float = 0.0,
    ) -> torch.Tensor:
        """Training timesteps: uniform over 0..T-1 (DDPM, Algorithm 1) when ``log_sigma`` is None; else the
        discrete step nearest, in ln sigma, to a noise level drawn as ln sigma ~ N(mean, std^2) with
        ``log_sigma = (mean, std)``, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), except that a share
        ``uniform_share`` of the images, chosen at random, keep a uniform step. EDM draws its levels so
        (Karras et al. 2022, section 5 and Table 1: P_mean = -1.2, P_std = 1.2).

        Uniform steps of the cosine schedule put ln sigma at mean 0 with std pi/2 (a hyperbolic-secant
        law); a narrower law spends the steps where the loss can still fall, and the uniform share keeps
        the far tails (the last denoising steps) trained.
        """
        uniform = torch.randint(self.num_train_timesteps, (batch,), device=device, generator=generator)
        if log_sigma is None:
            return uniform
        mean, std = log_sigma
        drawn = mean + std * torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        table = self.log_sigmas.to(device)
        above = torch.searchsorted(table, drawn).clamp(1, self.num_train_timesteps - 1)
        nearer_below = (drawn - table[above - 1]) < (table[above] - drawn)
        keep_uniform = torch.rand(batch, device=device, generator=generator) < uniform_share
        return torch.where(keep_uniform, uniform, above - nearer_below.long())

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is regressed onto: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
        if self.prediction == "eps":
            return noise
        ab = self.alphas_cumprod
        return self._at(ab.sqrt(), t, x0) * noise - self._at((1 - ab).sqrt(), t, x0) * x0

    def training_loss(
        self, output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, min_snr_gamma: float = 0.0
    ) -> torch.Tensor:
        """Mean squared error of the network output against its target (the seed's "simple" loss).

        With ``min_snr_gamma`` > 0, each image's error is weighted as in Min-SNR-gamma (Hang et al.
        2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 7 and 8): the x0-space
        weight min(SNR_t, gamma), with SNR_t = alpha_bar / (1 - alpha_bar), expressed for this
        prediction: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v. Low-noise steps,
        whose easy targets otherwise dominate, weigh less.
        """
        target = self.training_target(x0, t, noise)
        error = (output.float() - target.float()).square().flatten(1).mean(dim=1)
        if min_snr_gamma > 0:
            snr = self.alphas_cumprod.to(t.device)[t] / (1 - self.alphas_cumprod.to(t.device)[t])
            clipped = snr.clamp(max=min_snr_gamma)
            error = error * (clipped / snr if self.prediction == "eps" else clipped / (snr + 1)).float()
        return error.mean()
