"""Diffusion math and samplers, independent of any network."""

from ddpm.diffusion import PREDICTIONS, TIMESTEP_SAMPLINGS, DiffusionConfig, GaussianDiffusion
from ddpm.generation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLING,
    GUIDED_STEPS,
    SamplingOptions,
    generate,
    image_generator,
    prompt_contexts,
)
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import SAMPLERS, SPACINGS, THRESHOLDS, randn_like, sampling_timesteps, threshold_x0
from ddpm.schedule import cosine_beta_schedule

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLING",
    "GUIDED_STEPS",
    "PREDICTIONS",
    "SAMPLERS",
    "SPACINGS",
    "THRESHOLDS",
    "TIMESTEP_SAMPLINGS",
    "DiffusionConfig",
    "GaussianDiffusion",
    "SamplingOptions",
    "classifier_free_guidance",
    "cosine_beta_schedule",
    "generate",
    "image_generator",
    "prompt_contexts",
    "randn_like",
    "sampling_timesteps",
    "threshold_x0",
]
