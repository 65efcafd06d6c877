"""Guided generation with one seed per image, shared by training, sampling, evaluation and the page.

``SamplingOptions`` holds how images are sampled, and its defaults are the project's: train.py's
sample grids, sample.py, evaluate.py, serve.py and the pipeline all start from ``DEFAULT_SAMPLING``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.guidance import NetFn, classifier_free_guidance
from ddpm.options import OutOfRange, check, option
from ddpm.samplers import SAMPLERS, SPACINGS, THRESHOLDS, Callback

MAX_GUIDANCE_SCALE = 30.0
GUIDED_STEPS = 20  # a guided model's steps when none are asked for (a distilled student has its own)


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled: the single declaration of every sampling knob.

    Each field carries its default, help text and rule (ddpm/options.py): sample.py's, evaluate.py's and
    serve.py's flags, the page's API body and the one check are all made from these fields, so a new
    knob is one field here (and its test). Constructing options checks them (OutOfRange otherwise).
    """

    # the SDE solver: the ODE's carries the network's errors to the end as stray specks (docs/results.md)
    sampler: str = option("dpmpp_2m_sde", help="the sampler (ddpm/samplers.py)", choices=tuple(SAMPLERS))
    # None: the model's own default, GUIDED_STEPS for a guided model, the most a distilled student samples in
    steps: int | None = option(
        None,
        help=f"sampling steps (network calls per image; default {GUIDED_STEPS}, a distilled model its most, 4)",
        low=1,
    )
    # beyond 30 every update is a step far outside the data: the x0 prediction only saturates
    guidance_scale: float = option(6.0, help="classifier-free guidance scale s", low=0, high=MAX_GUIDANCE_SCALE)
    spacing: str = option("trailing", help="which timesteps the steps visit", choices=SPACINGS)
    threshold: str = option(
        "clip", help="x0 thresholding: clip to [-1, 1], or Imagen's dynamic thresholding", choices=THRESHOLDS
    )
    eta: float | None = option(
        None,
        help="DDIM noise: 0 deterministic (default), 1 as ancestral DDPM; ddim only",
        low=0,
        only_with=("sampler", "ddim"),
    )
    # the default guides the high-noise steps, where the digit is decided, and leaves the strokes to the
    # conditional model (see docs/results.md)
    guidance_interval: tuple[float, float] | None = option(
        (2.0, math.inf),
        help="guide only at noise levels LOW < sigma_t <= HIGH (ddpm/guidance.py, Kynkaanniemi et al. 2024): "
        "the default guides the high-noise steps; 0 inf guides every step",
        interval=True,
        metavar=("LOW", "HIGH"),
    )
    guidance_rescale: float = option(
        0.0, help="phi of guidance rescale (Lin et al. 2024, ddpm/guidance.py); 0 is plain guidance", low=0, high=1
    )
    guidance_parallel: float = option(
        1.0,
        help="eta of adaptive projected guidance (Sadat et al. 2024, ddpm/guidance.py): the weight of the guidance "
        "update's part parallel to the conditional x0 prediction; 1 is plain guidance, 0 drops that part",
        low=0,
        high=1,
    )

    def __post_init__(self) -> None:
        check(self)

    def replace(self, **changes) -> SamplingOptions:
        return dataclasses.replace(self, **changes)

    def with_steps(self, default: int) -> SamplingOptions:
        """These options with ``default`` steps where they ask for none (the model's own default)."""
        return self if self.steps is not None else self.replace(steps=default)

    def check_model(self, num_train_timesteps: int) -> None:
        """Raise OutOfRange if a model of ``num_train_timesteps`` cannot take these options."""
        if self.steps is not None and self.steps > num_train_timesteps:
            raise OutOfRange(
                "steps",
                "{steps} {value} exceeds the model's {t} training timesteps; use at most {t}",
                value=self.steps,
                t=num_train_timesteps,
            )

    def sampler_kwargs(self) -> dict:
        """The keyword arguments of the sampler function beyond the shared ones."""
        kwargs = {"spacing": self.spacing, "threshold": self.threshold}
        return kwargs if self.eta is None else {**kwargs, "eta": self.eta}


DEFAULT_SAMPLING = SamplingOptions()
DEFAULT_BATCH_SIZE = 256  # images per forward pass: a speed setting, it does not change the images


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image ``index`` of a run seeded ``seed``: independent of batch size and count
    (as in EDM's generate.py), derived through NumPy's SeedSequence so nearby seeds do not collide."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(state)


def prompt_contexts(
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    prompts: Sequence[str],
    num_samples: int,
    negative_prompt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) for :func:`generate`, from one call of a text encoder's ``encode``.

    cond holds each prompt's tokens ``num_samples`` times, prompt-major ([P * num_samples, L, D]);
    uncond ([1, L, D]) those of ``negative_prompt``, which takes the unconditional half of guidance:
    the empty prompt gives plain classifier-free guidance, another prompt steers away from itself.
    """
    tokens, _ = encode([*prompts, negative_prompt])
    return tokens[:-1].repeat_interleave(num_samples, dim=0), tokens[-1:]


@torch.no_grad()
def generate(
    net: NetFn,
    diffusion: GaussianDiffusion,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    options: SamplingOptions = DEFAULT_SAMPLING,
    *,
    image_shape: Sequence[int],
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_indices: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
    callback: Callback = None,
    bf16: bool = False,
    guide_net: NetFn | None = None,
) -> torch.Tensor:
    """Sample one image of ``image_shape`` ([C, H, W]) per row of ``cond`` ([N, L, D] text tokens)
    with classifier-free guidance, as ``options`` say (``GUIDED_STEPS`` steps where they name none).

    Images live in [-1, 1], so x0 predictions are clipped there by default (``threshold``): at the
    first trailing step (t = T - 1, where the capped cosine schedule leaves sqrt(alpha_bar) ~ 5e-5)
    an eps error of 0.1 would otherwise become an x0 error of ~2000 that no later step undoes.

    Image i starts from noise drawn by ``image_generator(seed, image_indices[i])`` (default: i) and uses
    that generator for all its sampling noise, so it is the same whatever the batch size; images given
    the same index and prompt are the same image.
    ``bf16`` runs the network under bf16 autocast; the sampler's arithmetic stays in x_T's dtype.
    ``callback(i, t, x_t, x0)`` sees every step of every batch. ``guide_net``: autoguidance's worse
    network (ddpm/guidance.py), in place of the unconditional prompt. Returns [N, C, H, W] in [-1, 1].
    """
    device = cond.device
    options = options.with_steps(GUIDED_STEPS)
    sample_fn = SAMPLERS[options.sampler]
    indices = range(len(cond)) if image_indices is None else image_indices
    out = []
    for start in range(0, len(cond), batch_size):
        chunk = cond[start : start + batch_size]
        gens = [image_generator(seed, int(indices[start + i]), device) for i in range(len(chunk))]
        x_T = torch.stack([torch.randn(*image_shape, generator=g, device=device) for g in gens])
        eps_fn = classifier_free_guidance(
            net,
            diffusion,
            chunk,
            uncond,
            options.guidance_scale,
            options.guidance_interval,
            options.guidance_rescale,
            options.guidance_parallel,
            guide_net,
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(
                sample_fn(
                    eps_fn, x_T, diffusion, options.steps, generator=gens, callback=callback, **options.sampler_kwargs()
                )
            )
        if progress:
            progress(len(chunk))
    return torch.cat(out)
