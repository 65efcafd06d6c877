"""The diffusion math against closed forms computed independently in float64 NumPy."""

import math

import numpy as np
import pytest
import torch

from ddpm import GaussianDiffusion, classifier_free_guidance, cosine_beta_schedule, sampling_timesteps

T = 1000


def f(t, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0)."""
    return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(cosine_beta_schedule(T))


def test_cosine_schedule_matches_closed_form(diffusion):
    betas = cosine_beta_schedule(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    t = np.arange(T)
    expected_alpha_bar = f(t + 1) / f(0)
    # Every beta below the cap is exact, so alpha_bar follows the closed form until the clipped last step.
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy()[:-1], expected_alpha_bar[:-1], rtol=1e-12)
    assert betas[-1].item() == 0.999  # f(T) = 0 would give beta = 1; the cap keeps it finite
    assert (betas[:-1] < 0.999).all() and (torch.diff(betas) > 0).all()
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)


def test_schedule_cap_and_bad_input():
    assert cosine_beta_schedule(10, max_beta=0.5).max().item() == 0.5
    with pytest.raises(ValueError):
        cosine_beta_schedule(0)
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))


def test_q_sample_is_eq4(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998, 999])
    ab = f(t.numpy() + 1) / f(0)
    ab[-1] = ab[-2] * (1 - 0.999)  # the clipped last step
    expected = np.sqrt(ab)[:, None, None, None] * x0.numpy() + np.sqrt(1 - ab)[:, None, None, None] * noise.numpy()
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise).numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t,s", [(1, 0), (50, 49), (400, 399), (900, 899), (998, 898), (899, 99), (500, 0)])
def test_q_posterior_is_bayes_rule(diffusion, t, s):
    """Posterior of x_s from the Gaussian product q(x_s | x_0) q(x_t | x_s), derived independently, for
    neighbouring timesteps (DDPM eq. 6-7) and for the jumps of a respaced chain alike."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    mean, var = diffusion.q_posterior(x0, x_t, t, s)
    ab_s, ab_t = f(s + 1) / f(0), f(t + 1) / f(0)  # timestep index i holds alpha_bar at i + 1 of eq. 17
    alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s  # q(x_t | x_s) = N(sqrt(alpha) x_s, beta)
    precision = 1 / (1 - ab_s) + alpha / beta
    expected_mean = (math.sqrt(ab_s) * x0.numpy() / (1 - ab_s) + math.sqrt(alpha) * x_t.numpy() / beta) / precision
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-9)
    assert var == pytest.approx(1 / precision, rel=1e-9)


def test_posterior_to_clean_data_is_x0(diffusion):
    x0, x_t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    for t in (0, 500):
        mean, var = diffusion.q_posterior(x0, x_t, t, -1)
        torch.testing.assert_close(mean, x0)
        assert var == 0
    with pytest.raises(ValueError):
        diffusion.q_posterior(x0, x_t, 5, 5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_training_target_converts_back_to_the_noise(prediction):
    diffusion = GaussianDiffusion(cosine_beta_schedule(T), prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x0, noise = (
        torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([3, 300, 990])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.to_eps(x_t, t, diffusion.training_target(x0, t, noise)), noise)


def test_v_target_closed_form():
    diffusion = GaussianDiffusion(cosine_beta_schedule(T), prediction="v")
    x0, noise, t = (
        torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64),
        torch.full((1, 1, 1, 1), -2.0, dtype=torch.float64),
        torch.tensor([250]),
    )
    ab = f(251) / f(0)
    assert diffusion.training_target(x0, t, noise).item() == pytest.approx(
        math.sqrt(ab) * -2.0 - math.sqrt(1 - ab) * 0.5, rel=1e-12
    )


def test_training_loss_is_mse():
    diffusion = GaussianDiffusion(cosine_beta_schedule(T))
    out, noise = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    assert diffusion.training_loss(out, torch.zeros_like(out), torch.tensor([1, 2]), noise).item() == pytest.approx(9.0)


def test_timestep_spacings():
    assert sampling_timesteps(T, T) == list(range(T - 1, -1, -1))
    assert sampling_timesteps(T, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(T, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(T, 4, "linspace") == [999, 666, 333, 0]
    with pytest.raises(ValueError):
        sampling_timesteps(T, T + 1)
    with pytest.raises(ValueError):
        sampling_timesteps(T, 10, "sideways")


def context_echo(calls: list[int]):
    """A network whose eps is its prompt's first context value (it records each batch size), a schedule,
    and three conditional prompts worth 2.0 and an unconditional one worth 0.5."""

    def net(x, t, context):
        calls.append(len(x))
        return context[:, :1, :1].reshape(-1, 1, 1, 1).expand_as(x).clone()

    diffusion = GaussianDiffusion(cosine_beta_schedule(T))
    return net, diffusion, torch.full((3, 1, 1), 2.0), torch.full((1, 1, 1), 0.5)


def test_classifier_free_guidance_combines_in_one_call():
    calls = []
    net, diffusion, cond, uncond = context_echo(calls)
    eps_fn = classifier_free_guidance(net, diffusion, cond, uncond, scale=8.0)
    eps = eps_fn(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    assert calls == [6]
    torch.testing.assert_close(eps, torch.full((3, 1, 2, 2), 0.5 + 8.0 * (2.0 - 0.5)))
    unguided = classifier_free_guidance(net, diffusion, cond, uncond, scale=1.0)
    torch.testing.assert_close(
        unguided(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)), torch.full((3, 1, 2, 2), 2.0)
    )


def test_min_snr_weights_each_image_by_the_closed_form():
    """Hang et al. 2023: weight min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, SNR = ab / (1 - ab)."""
    t = torch.tensor([5, 500, 990])
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    snr = [(f(s + 1) / f(0)) / (1 - f(s + 1) / f(0)) for s in t.tolist()]
    out, noise = torch.zeros(3, 1, 2, 2), torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    eps = GaussianDiffusion(cosine_beta_schedule(T))
    expected = sum(e**2 * min(s, 5.0) / s for e, s in zip((1.0, 2.0, 3.0), snr)) / 3
    assert eps.training_loss(out, torch.zeros_like(out), t, noise, min_snr_gamma=5.0).item() == pytest.approx(expected)
    v = GaussianDiffusion(cosine_beta_schedule(T), prediction="v")
    target = v.training_target(torch.zeros_like(out), t, noise)
    errors = target.square().flatten(1).mean(1).tolist()
    expected_v = sum(e * min(s, 5.0) / (s + 1) for e, s in zip(errors, snr)) / 3
    assert v.training_loss(out, torch.zeros_like(out), t, noise, min_snr_gamma=5.0).item() == pytest.approx(expected_v)


def test_guidance_interval_guides_only_inside_it_with_one_pass_outside():
    calls = []
    net, diffusion, cond, uncond = context_echo(calls)
    eps_fn = classifier_free_guidance(net, diffusion, cond, uncond, scale=4.0, interval=(2.0, math.inf))
    for t, guided in ((999, True), (10, False)):
        ab = float(diffusion.alphas_cumprod[t])
        assert (math.sqrt((1 - ab) / ab) > 2.0) == guided
        eps = eps_fn(torch.zeros(3, 1, 2, 2), torch.full((3,), t))
        torch.testing.assert_close(eps, torch.full((3, 1, 2, 2), 0.5 + 4.0 * 1.5 if guided else 2.0))
    assert calls == [6, 3]


def test_guidance_rescale_matches_the_conditional_x0_spread():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(cosine_beta_schedule(T))
    eps_c, eps_u = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    net = lambda x, t, context: torch.where(
        context[:, :1, :1, None] > 0, eps_c.repeat(2, 1, 1, 1)[: len(x)], eps_u.repeat(2, 1, 1, 1)[: len(x)]
    )
    cond, uncond = torch.ones(2, 1, 1), -torch.ones(1, 1, 1)
    x, t = torch.randn(2, 1, 4, 4), torch.full((2,), 400)
    ab = float(diffusion.alphas_cumprod[400])
    to_x0 = lambda e: (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
    rescaled = classifier_free_guidance(net, diffusion, cond, uncond, 6.0, rescale=1.0)(x, t)
    spread = lambda e: to_x0(e).flatten(1).std(1)
    torch.testing.assert_close(spread(rescaled), spread(eps_c), rtol=1e-4, atol=1e-5)


def test_adaptive_projected_guidance_keeps_the_orthogonal_update_and_eta_of_the_parallel_one():
    """Sadat et al. 2024, in x0 space: x0 = x0_c + (s - 1) * (delta_orth + eta * delta_par), delta = x0_c - x0_u,
    the parallel part along x0_c per image; computed here by hand on 2-pixel images."""
    diffusion = GaussianDiffusion(cosine_beta_schedule(T))
    t, ab = torch.full((1,), 400), float(diffusion.alphas_cumprod[400])
    x = torch.tensor([0.3, -0.2]).reshape(1, 1, 1, 2)
    x0_c, x0_u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])  # delta = (1, 1): par (1, 0), orth (0, 1)
    to_eps = lambda x0: (x - math.sqrt(ab) * x0.reshape(1, 1, 1, 2)) / math.sqrt(1 - ab)
    net = lambda x_, t_, context: torch.where(context[:, :1, :1, None] > 0, to_eps(x0_c), to_eps(x0_u))
    cond, uncond = torch.ones(1, 1, 1), -torch.ones(1, 1, 1)
    for eta, expected in ((1.0, [1 + 3.0, 3.0]), (0.0, [1.0, 3.0]), (0.5, [1 + 1.5, 3.0])):  # scale 4: s - 1 = 3
        eps = classifier_free_guidance(net, diffusion, cond, uncond, 4.0, parallel=eta)(x, t)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        torch.testing.assert_close(x0.flatten(), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    plain = classifier_free_guidance(net, diffusion, cond, uncond, 4.0)(x, t)
    torch.testing.assert_close(classifier_free_guidance(net, diffusion, cond, uncond, 4.0, parallel=1.0)(x, t), plain)


def test_autoguidance_guides_with_the_worse_network_on_the_same_prompt():
    """Karras et al. 2024: eps = eps_guide + s * (eps - eps_guide), the guide given the same prompt; the
    unconditional prompt is not used. The stand-in networks echo their prompt's value (2.0), times 1 or 0.25."""
    calls, guide_calls = [], []
    net, diffusion, cond, uncond = context_echo(calls)

    def guide(x, t, context):
        guide_calls.append(len(x))
        return 0.25 * net(x, t, context)

    eps_fn = classifier_free_guidance(net, diffusion, cond, uncond, scale=3.0, guide=guide)
    eps = eps_fn(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(eps, torch.full((3, 1, 2, 2), 0.5 + 3.0 * (2.0 - 0.5)))  # guide: 0.25 * 2.0
    assert guide_calls == [3] and calls == [3, 3]  # the model once, the guide (which wraps it) once


def test_lognormal_timesteps_are_the_nearest_steps_to_the_drawn_noise_levels(diffusion):
    """Karras et al. 2022: ln sigma ~ N(-1.2, 1.2^2); each drawn step is the one whose closed-form ln sigma_t
    (sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t, eq. 17's alpha_bar) is nearest to the drawn level, except
    for the uniform share, which keeps the uniform step drawn first."""
    n = 20_000
    t = diffusion.sample_timesteps(n, torch.Generator().manual_seed(0), torch.device("cpu"), (-1.2, 1.2), 0.25)
    same = torch.Generator().manual_seed(0)  # the same draws, in the same order
    uniform = torch.randint(T, (n,), generator=same).numpy()
    drawn = (-1.2 + 1.2 * torch.randn(n, generator=same, dtype=torch.float64)).numpy()
    keep_uniform = (torch.rand(n, generator=same) < 0.25).numpy()
    alpha_bar = f(np.arange(T) + 1) / f(0)
    log_sigma = 0.5 * np.log((1 - alpha_bar) / alpha_bar)
    nearest = np.abs(log_sigma[None, :-1] - drawn[:, None]).argmin(axis=1)  # the clipped last step never wins
    np.testing.assert_array_equal(t.numpy(), np.where(keep_uniform, uniform, nearest))
    assert keep_uniform.mean() == pytest.approx(0.25, abs=0.01)
    levels = log_sigma[t.numpy()[~keep_uniform]]
    assert levels.mean() == pytest.approx(-1.2, abs=0.03) and levels.std() == pytest.approx(1.2, abs=0.03)


def test_uniform_timesteps_are_drawn_as_before(diffusion):
    """No law given: one randint over 0..T-1, the same draws as DDPM's training (and older checkpoints' resume)."""
    t = diffusion.sample_timesteps(1000, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(t, torch.randint(T, (1000,), generator=torch.Generator().manual_seed(3)))
