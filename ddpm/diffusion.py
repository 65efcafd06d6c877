"""The DDPM forward process and its posterior (Ho et al. 2020), named as in the paper.

Every schedule quantity is kept in float64 and cast to the data's dtype only when it is
applied, so a bf16 or fp32 model never sees rounding in alpha_bar near t = T.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ddpm.schedule import cosine_beta_schedule

PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion a model is trained for: the number of timesteps T of the cosine schedule, and
    what the network predicts. Both fix the meaning of a model's weights."""

    num_train_timesteps: int = 1000
    prediction: str = field(default="eps", metadata={"choices": PREDICTIONS})


class GaussianDiffusion:
    """Schedule arithmetic for a discrete-time DDPM with ``len(betas)`` steps.

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
        self.num_steps = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0), DDPM eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

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

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), DDPM eq. 6-7."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t).expand_as(x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x_0 given the noise: (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        ab = self.alphas_cumprod
        return self._at(ab.rsqrt(), t, x_t) * x_t - self._at((1 / ab - 1).sqrt(), t, x_t) * eps

    def to_eps(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The noise implied by a network ``output`` of this diffusion's prediction type."""
        if self.prediction == "eps":
            return output
        ab = self.alphas_cumprod
        return self._at(ab.sqrt(), t, x_t) * output + self._at((1 - ab).sqrt(), t, x_t) * x_t

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
