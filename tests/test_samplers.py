"""Samplers on Gaussian data, whose optimal noise predictor is known in closed form.

If x0 ~ N(mu, s^2) per pixel then x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and
E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). A correct sampler driven
by it must return samples distributed as N(mu, s^2).
"""
import pytest
import torch

from ddpm import SAMPLERS, GaussianDiffusion, cosine_beta_schedule, generate, image_generator

MU, SIGMA = 0.3, 0.5


def gaussian_eps_fn(diffusion):
    ab_all = diffusion.alphas_cumprod

    def eps_fn(x, t):
        ab = ab_all[t].reshape(-1, *[1] * (x.ndim - 1))
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / (ab * SIGMA**2 + 1 - ab)).to(x.dtype)

    return eps_fn


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(cosine_beta_schedule(1000))


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20)])
def test_sampler_reproduces_gaussian_data(diffusion, name, steps):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    x0 = SAMPLERS[name](gaussian_eps_fn(diffusion), x_T, diffusion, steps, generator=g)
    assert x0.dtype == torch.float64 and x0.shape == x_T.shape
    # 20,000 samples: the standard error of the mean is 0.0035, of the std about 0.0025.
    assert x0.mean().item() == pytest.approx(MU, abs=0.015)
    assert x0.std().item() == pytest.approx(SIGMA, abs=0.015)


def test_respaced_ddpm_converges(diffusion):
    """With few steps the posterior variance beta-tilde under-disperses (Nichol & Dhariwal 2021,
    section 3.1); the gap must shrink as steps grow, and the mean stays right throughout."""
    gaps = []
    for steps in (10, 50, 250):
        g = torch.Generator().manual_seed(0)
        x0 = SAMPLERS["ddpm"](gaussian_eps_fn(diffusion), torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64),
                              diffusion, steps, generator=g)
        assert x0.mean().item() == pytest.approx(MU, abs=0.015)
        gaps.append(SIGMA - x0.std().item())
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 0.015


def test_sampler_keeps_dtype_and_device(diffusion):
    x_T = torch.randn(4, 1, 2, 2, dtype=torch.float32)
    for sampler in SAMPLERS.values():
        assert sampler(gaussian_eps_fn(diffusion), x_T, diffusion, 5).dtype == torch.float32


def test_eps_fn_sees_int64_timesteps_in_range(diffusion):
    seen = []

    def eps_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    SAMPLERS["ddpm"](eps_fn, torch.zeros(3, 1, 2, 2), diffusion, 10)
    assert all(t.dtype == torch.int64 and t.shape == (3,) for t in seen)
    assert [int(t[0]) for t in seen] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_same_seed_same_images_whatever_the_batch(diffusion):
    """Image i depends only on (seed, i): identical for batch sizes 1 and 7."""
    eps_fn = gaussian_eps_fn(diffusion)

    def net(x, t, context):  # eps-prediction net ignoring the context
        return eps_fn(x, t)

    cond, uncond = torch.zeros(7, 8, 4), torch.zeros(1, 8, 4)
    one_by_one = generate(net, diffusion, cond, uncond, sampler="ddpm", steps=10, guidance_scale=1.0, seed=5, batch_size=1)
    all_at_once = generate(net, diffusion, cond, uncond, sampler="ddpm", steps=10, guidance_scale=1.0, seed=5, batch_size=7)
    torch.testing.assert_close(one_by_one, all_at_once, rtol=0, atol=1e-6)
    again = generate(net, diffusion, cond, uncond, sampler="ddpm", steps=10, guidance_scale=1.0, seed=5, batch_size=3)
    torch.testing.assert_close(again, all_at_once, rtol=0, atol=1e-6)
    other = generate(net, diffusion, cond, uncond, sampler="ddpm", steps=10, guidance_scale=1.0, seed=6, batch_size=7)
    assert (other - all_at_once).abs().max() > 0.1


def test_image_generators_differ():
    a = torch.randn(4, generator=image_generator(0, 0))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 1)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 0)))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 0)))
