"""Diffusion math and samplers, independent of any network."""
from ddpm.diffusion import GaussianDiffusion
from ddpm.guidance import classifier_free_guidance
from ddpm.pipeline import generate, image_generator
from ddpm.samplers import SAMPLERS, randn_like, sampling_timesteps
from ddpm.schedule import cosine_beta_schedule

__all__ = [
    "GaussianDiffusion", "SAMPLERS", "classifier_free_guidance", "cosine_beta_schedule", "generate", "image_generator",
    "randn_like", "sampling_timesteps",
]
