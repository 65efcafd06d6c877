"""Few-step students of a guided sampler: the jumps they take and what each jump is trained to do.

A student samples with DDIM (eta = 0, trailing spacing) in N steps, N one of a few counts (1, 2, 4).
Each of its steps jumps from timestep t to the next timestep s of its N-step grid (s = -1: clean
data), and the student is told both t and s, and the guidance scale w (Meng et al. 2023, "On
Distillation of Guided Diffusion Models", section 4.1: w as an input of the student), so that one
network serves every step count and scale with no unconditional pass. It is also told the negative
prompt that took the unconditional prompt's place in the teacher's guidance (the empty prompt: plain
guidance), so that a negative prompt steers it as it steers the teacher.

Its target for a jump is the teacher's: the teacher's guided probability-flow ODE solved from the
same x_t, at many steps, passes through x_s. One DDIM step from x_t with the prediction x0 lands on

    x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t,

(Song et al. 2021, eq. 12 with sigma = 0; alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)), so
the student is regressed onto the x0 that makes this step land on the teacher's x_s:

    x0~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2,
the target x~), there for two teacher steps, here for a whole segment of the teacher's trajectory
(as TRACT, Berthelot et al. 2023, does for its phases). For s = -1 the target is the teacher's
clean endpoint: the one-step student is Luhman & Luhman 2021's direct distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import DEFAULT_SAMPLING, SamplingOptions
from ddpm.samplers import sampling_timesteps

# what a student's own sampling fixes: DDIM (eta 0) on its trailing grid, no thresholding (its intermediate
# targets x0~ may leave [-1, 1]) and no guidance wrapper (the scale is its input)
STUDENT_SAMPLING = dict(
    sampler="ddim",
    spacing="trailing",
    threshold="none",
    eta=None,
    guidance_interval=None,
    guidance_rescale=0.0,
    guidance_parallel=1.0,
)
StudentFn = Callable[..., torch.Tensor]  # net(x, t, context, guidance=[B], lands_on=[B], negative=[B, L, D] | None)
STUDENT_SPACING = STUDENT_SAMPLING["spacing"]
CLEAN = -1  # where a last step lands


def landings(num_train_timesteps: int, steps: int) -> dict[int, int]:
    """Where each step of an N-step student lands: timestep t -> the next of its grid (CLEAN last)."""
    ts = sampling_timesteps(num_train_timesteps, steps, STUDENT_SPACING)
    return dict(zip(ts, ts[1:] + [CLEAN]))


def student_jumps(num_train_timesteps: int, step_counts: Sequence[int]) -> list[tuple[int, int]]:
    """Every (t, s) jump a student that samples in each of ``step_counts`` steps takes, once each."""
    jumps = [(t, s) for n in step_counts for t, s in landings(num_train_timesteps, n).items()]
    return list(dict.fromkeys(jumps))


def stops(num_train_timesteps: int, step_counts: Sequence[int]) -> list[int]:
    """The timesteps a student's steps start from, descending: where the teacher's trajectory is kept."""
    return sorted({t for t, _ in student_jumps(num_train_timesteps, step_counts)}, reverse=True)


Number = float | torch.Tensor  # a float, or a tensor that broadcasts over the batch


def jump_target_x0(x_t: torch.Tensor, x_s: torch.Tensor, alpha_bar_t: Number, alpha_bar_s: Number) -> torch.Tensor:
    """x0~, the x0 prediction whose DDIM step from x_t (at alpha_bar_t) lands on x_s (at alpha_bar_s; 1 for
    clean data, where x0~ = x_s): Salimans & Ho 2022, Algorithm 2 (see the module docstring)."""
    ratio = ((1 - alpha_bar_s) / (1 - alpha_bar_t)) ** 0.5  # sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_bar_s**0.5 - ratio * alpha_bar_t**0.5)


def alpha_bar_at(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t (float64) for a batch of timesteps, with alpha_bar = 1 at CLEAN."""
    table = torch.cat([diffusion.alphas_cumprod, torch.ones(1, dtype=torch.float64)]).to(t.device)
    return table[torch.where(t == CLEAN, len(table) - 1, t)]


@torch.no_grad()
def teacher_trajectory(
    sample_fn: Callable[..., torch.Tensor],
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    teacher_steps: int,
    keep: Sequence[int],
    **sampler_options,
) -> torch.Tensor:
    """[B, len(keep) + 1, ...]: a deterministic sampler's states at the timesteps ``keep`` of its
    ``teacher_steps``-step run from x_T, and its clean endpoint last. Every timestep kept must be one
    the sampler visits (the N-step student grids lie on a 20-step trailing teacher's)."""
    kept: dict[int, torch.Tensor] = {}

    def callback(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if t in keep:
            kept[t] = x_t.clone()

    x0 = sample_fn(eps_fn, x_T, diffusion, teacher_steps, callback=callback, **sampler_options)
    missing = [t for t in keep if t not in kept]
    if missing:
        raise ValueError(
            f"a {teacher_steps}-step teacher does not visit timesteps {missing}; use a multiple of the student's steps"
        )
    return torch.stack([kept[t] for t in keep] + [x0], dim=1)


def distillation_loss(
    student: StudentFn,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    x_s: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    context: torch.Tensor,
    guidance: torch.Tensor,
    negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the student's v at (x_t, t) jumping to s against the v of x0~: in x0 terms an
    error weighted by SNR_t + 1, Salimans & Ho 2022's "SNR+1" weighting (section 4), which keeps the
    weight of the first, nearly pure-noise step (SNR ~ 0) from vanishing. ``negative``: the tokens of the
    negative prompt the teacher was guided away from, for a student that reads them."""
    shape = (-1, *[1] * (x_t.ndim - 1))
    ab_t, ab_s = alpha_bar_at(diffusion, t).reshape(shape), alpha_bar_at(diffusion, s).reshape(shape)
    target = v_of_x0(x_t.double(), jump_target_x0(x_t.double(), x_s.double(), ab_t, ab_s), ab_t).float()
    output = student(x_t, t, context, guidance=guidance, lands_on=s, negative=negative)
    return (output.float() - target).square().mean()


def v_of_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The v (Salimans & Ho 2022, eq. 9: v = alpha eps - sigma x0) that predicts ``x0`` from x_t:
    (alpha x_t - x0) / sigma. ``alpha_bar_t`` broadcasts over the batch."""
    return (alpha_bar_t.sqrt() * x_t - x0) / (1 - alpha_bar_t).sqrt()


def as_sampler_net(
    student: StudentFn,
    diffusion: GaussianDiffusion,
    steps: int,
    guidance_scale: float,
    negative: torch.Tensor | None = None,
):
    """The student as the samplers' ``net(x, t, context)`` for an N-step run at one guidance scale (and, for a
    student that reads one, a negative prompt's tokens ``negative`` [1, L, D]): each call at timestep t is told
    them and where its step lands. Sample it with DDIM, eta 0, trailing."""
    lands = landings(diffusion.num_train_timesteps, steps)

    def net(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if int(t[0]) not in lands:
            raise ValueError(f"a {steps}-step student was asked for timestep {int(t[0])}, off its grid {list(lands)}")
        lands_on = torch.full_like(t, lands[int(t[0])])
        scale = torch.full((len(x),), guidance_scale, device=x.device)
        return student(x, t, context, guidance=scale, lands_on=lands_on, negative=negative)

    return net


def student_options(options: SamplingOptions) -> SamplingOptions:
    """The options a student samples ``options`` with: its own (STUDENT_SAMPLING), at guidance scale 1 for the
    samplers (the scale goes to the student, through :func:`as_sampler_net`)."""
    return options.replace(**STUDENT_SAMPLING, guidance_scale=1.0)


def ignored_by_student(options: SamplingOptions) -> list[str]:
    """The options set away from their defaults that a student's own sampling overrides."""
    return [name for name in STUDENT_SAMPLING if getattr(options, name) != getattr(DEFAULT_SAMPLING, name)]
