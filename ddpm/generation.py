"""Guided generation with one seed per image, shared by training, sampling, evaluation and the page.

``SamplingOptions`` holds how images are sampled, and its defaults are the project's: train.py's
sample grids, sample.py, evaluate.py and the pipeline all start from ``DEFAULT_SAMPLING``.
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
from ddpm.samplers import SAMPLERS, SPACINGS, THRESHOLDS, Callback


@dataclass(frozen=True)
class SamplingOptions:
    """A sampler (``ddpm.samplers``), its network evaluations per image and spacing, the
    classifier-free guidance scale and what is done to each x0 prediction (``threshold``).
    ``eta`` is DDIM's noise (None: the sampler's default)."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance_scale: float = 6.0
    spacing: str = "trailing"
    threshold: str = "clip"
    eta: float | None = None
    # (sigma_lo, sigma_hi]: guide only there (ddpm/guidance.py); the default guides the high-noise steps,
    # where the digit is decided, and leaves the strokes to the conditional model (see the README's Results)
    guidance_interval: tuple[float, float] | None = (2.0, math.inf)
    guidance_rescale: float = 0.0  # phi of guidance rescale (ddpm/guidance.py); 0 is plain CFG

    def __post_init__(self) -> None:
        for name, known in (("sampler", SAMPLERS), ("spacing", SPACINGS), ("threshold", THRESHOLDS)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        if self.eta is not None and self.sampler != "ddim":
            raise ValueError(f"eta only applies to the ddim sampler, not {self.sampler}")

    def replace(self, **changes) -> SamplingOptions:
        return dataclasses.replace(self, **changes)

    def sampler_kwargs(self) -> dict:
        """The keyword arguments of the sampler function beyond the shared ones."""
        kwargs = {"spacing": self.spacing, "threshold": self.threshold}
        return kwargs if self.eta is None else {**kwargs, "eta": self.eta}


DEFAULT_SAMPLING = SamplingOptions()


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
    batch_size: int = 256,
    image_indices: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
    callback: Callback = None,
    bf16: bool = False,
) -> torch.Tensor:
    """Sample one image of ``image_shape`` ([C, H, W]) per row of ``cond`` ([N, L, D] text tokens)
    with classifier-free guidance, as ``options`` say.

    Images live in [-1, 1], so x0 predictions are clipped there by default (``threshold``): at the
    first trailing step (t = T - 1, where the capped cosine schedule leaves sqrt(alpha_bar) ~ 5e-5)
    an eps error of 0.1 would otherwise become an x0 error of ~2000 that no later step undoes.

    Image i starts from noise drawn by ``image_generator(seed, image_indices[i])`` (default: i) and uses
    that generator for all its sampling noise, so it is the same whatever the batch size; images given
    the same index and prompt are the same image.
    ``bf16`` runs the network under bf16 autocast; the sampler's arithmetic stays in x_T's dtype.
    ``callback(i, t, x_t, x0)`` sees every step of every batch. Returns [N, C, H, W] in [-1, 1].
    """
    device = cond.device
    sample_fn = SAMPLERS[options.sampler]
    indices = range(len(cond)) if image_indices is None else image_indices
    out = []
    for start in range(0, len(cond), batch_size):
        chunk = cond[start : start + batch_size]
        gens = [image_generator(seed, int(indices[start + i]), device) for i in range(len(chunk))]
        x_T = torch.stack([torch.randn(*image_shape, generator=g, device=device) for g in gens])
        eps_fn = classifier_free_guidance(
            net, diffusion, chunk, uncond, options.guidance_scale, options.guidance_interval, options.guidance_rescale
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
