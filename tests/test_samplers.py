"""Samplers on data whose optimal noise predictor is known in closed form.

If x0 ~ N(mu, s^2) per pixel then x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and
E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). A correct sampler driven
by it must return samples distributed as N(mu, s^2), and the probability-flow ODE, which keeps
every quantile, maps x_T to x0 = mu + s (x_T - sqrt(ab_T) mu) / sqrt(ab_T s^2 + 1 - ab_T) exactly.
For a point mass at v, eps = (x_t - sqrt(ab) v) / sqrt(1 - ab) and every x0 prediction is v.
"""

import math

import numpy as np
import pytest
import torch

from data.shapes import IMAGE_SHAPE
from ddpm import (
    SAMPLERS,
    GaussianDiffusion,
    SamplingOptions,
    classifier_free_guidance,
    cosine_beta_schedule,
    generate,
    image_generator,
    prompt_contexts,
    sampling_timesteps,
    threshold_x0,
)

MU, SIGMA = 0.3, 0.5
N = 20000
KS_CRITICAL = 1.949  # Kolmogorov distribution at alpha = 0.001: reject when sqrt(n_eff) * D exceeds it


def gaussian_eps_fn(diffusion):
    def eps_fn(x, t):
        assert bool((t == t[0]).all())  # samplers give the whole batch one timestep
        ab = float(diffusion.alphas_cumprod[t[0]])
        return math.sqrt(1 - ab) * (x - math.sqrt(ab) * MU) / (ab * SIGMA**2 + 1 - ab)

    return eps_fn


def point_mass_eps_fn(diffusion, v):
    def eps_fn(x, t):
        ab = float(diffusion.alphas_cumprod[t[0]])
        return (x - math.sqrt(ab) * v) / math.sqrt(1 - ab)

    return eps_fn


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(cosine_beta_schedule(1000))


def draw(diffusion, name, steps, seed, n=N, **options):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    return SAMPLERS[name](gaussian_eps_fn(diffusion), x_T, diffusion, steps, generator=g, **options).flatten().numpy()


def ks_two_sample(a, b):
    """sup |F_a - F_b| over the pooled points, from the two empirical CDFs."""
    points = np.concatenate([a, b])
    cdf = lambda s: np.searchsorted(np.sort(s), points, side="right") / len(s)
    return np.abs(cdf(a) - cdf(b)).max()


def ks_normal(a, mu, sigma):
    """sup |F_a - Phi((x - mu) / sigma)|, checking both sides of every jump of F_a."""
    a = np.sort(a)
    phi = 0.5 * (1 + torch.erf(torch.from_numpy((a - mu) / (sigma * math.sqrt(2)))).numpy())
    i = np.arange(1, len(a) + 1)
    return max((i / len(a) - phi).max(), (phi - (i - 1) / len(a)).max())


def test_ks_statistics_by_hand():
    assert ks_two_sample(np.array([1.0, 2.0, 3.0]), np.array([2.5, 3.5])) == pytest.approx(2 / 3)
    assert ks_normal(np.array([0.0]), 0.0, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name,steps,options",
    [
        ("ddpm", 1000, {}),
        ("ddim", 50, {}),
        ("ddim", 1000, {"eta": 1.0}),
        ("ddim", 250, {"eta": 0.5}),
        ("dpmpp_2m", 20, {}),
        ("dpmpp_2m_sde", 50, {}),
    ],
)
def test_sampler_reproduces_gaussian_data(diffusion, name, steps, options):
    x0 = draw(diffusion, name, steps, seed=0, **options)
    # 20,000 samples: the standard error of the mean is 0.0035, of the std about 0.0025.
    assert x0.mean() == pytest.approx(MU, abs=0.015)
    assert x0.std() == pytest.approx(SIGMA, abs=0.015)
    assert ks_normal(x0, MU, SIGMA) < KS_CRITICAL / math.sqrt(N)


def test_ddim_eta_one_is_ancestral_ddpm(diffusion):
    """Song et al. 2021, section 4.1: with eta = 1 DDIM's step is DDPM's posterior step."""
    ddpm, ddim = draw(diffusion, "ddpm", 1000, seed=1), draw(diffusion, "ddim", 1000, seed=2, eta=1.0)
    assert ddim.mean() == pytest.approx(ddpm.mean(), abs=0.015)
    assert ddim.std() == pytest.approx(ddpm.std(), abs=0.015)
    assert ks_two_sample(ddpm, ddim) < KS_CRITICAL * math.sqrt(2 / N)
    # Same noise, same path: both formulas give the same Gaussian step (here with 30 respaced steps).
    same_noise = [
        draw(diffusion, name, 30, seed=3, n=500, **opts) for name, opts in (("ddpm", {}), ("ddim", {"eta": 1.0}))
    ]
    np.testing.assert_allclose(*same_noise, rtol=0, atol=1e-9)


def test_sde_solver_starts_as_ddpm_and_disperses_better(diffusion):
    """SDE-DPM-Solver++(2M)'s first step is first order, DDPM's posterior step (Lu et al. 2022): with
    the same noise, the same x after it. Its second-order steps then keep the spread of the data where
    respaced DDPM under-disperses (test_respaced_ddpm_converges)."""
    seen = {}
    for name in ("ddpm", "dpmpp_2m_sde"):
        x_T = torch.randn(500, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        calls = []
        SAMPLERS[name](
            gaussian_eps_fn(diffusion),
            x_T,
            diffusion,
            10,
            generator=torch.Generator().manual_seed(1),
            callback=lambda *a, calls=calls: calls.append(a),
        )
        seen[name] = calls[1][2]  # the state the second network call sees
    torch.testing.assert_close(seen["ddpm"], seen["dpmpp_2m_sde"], rtol=0, atol=1e-12)
    for steps in (10, 20):
        ddpm, sde = (abs(draw(diffusion, name, steps, seed=0).std() - SIGMA) for name in ("ddpm", "dpmpp_2m_sde"))
        assert sde < ddpm / 3, (steps, sde, ddpm)


def ode_errors(diffusion, name, spacing, step_counts):
    """Max error against the exact probability-flow ODE solution from x_T on a grid of x_T."""
    ab = float(diffusion.alphas_cumprod[-1])
    x_T = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(-1, 1, 1, 1)
    exact = MU + SIGMA * (x_T - math.sqrt(ab) * MU) / math.sqrt(ab * SIGMA**2 + 1 - ab)
    eps_fn = gaussian_eps_fn(diffusion)
    return [
        (SAMPLERS[name](eps_fn, x_T, diffusion, n, spacing=spacing) - exact).abs().max().item() for n in step_counts
    ]


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_deterministic_samplers_converge_to_the_ode_solution(diffusion, spacing):
    counts = (10, 20, 40, 80, 160)
    ddim, dpm = ode_errors(diffusion, "ddim", spacing, counts), ode_errors(diffusion, "dpmpp_2m", spacing, counts)
    assert all(a > b for a, b in zip(ddim, ddim[1:])) and ddim[-1] < 0.025
    assert all(a > b for a, b in zip(dpm, dpm[1:])) and dpm[-1] < 0.016
    if spacing == "trailing":
        assert all(1.6 < a / b < 2.4 for a, b in zip(ddim, ddim[1:]))  # DDIM is first order
        assert all(d < e / 2 for d, e in zip(dpm, ddim)) and dpm[1] < 0.01  # DPM-Solver++(2M) much closer


def test_sampling_timesteps_by_hand():
    assert sampling_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sampling_timesteps(1000, 7) == [999, 856, 713, 570, 428, 285, 142]
    assert sampling_timesteps(1000, 1) == [999] and sampling_timesteps(1000, 1, "leading") == [0]
    for steps in (61, 103, 122, 333, 999):  # float strides once produced steps + 1 entries ending at -1
        ts = sampling_timesteps(1000, steps)
        assert len(set(ts)) == steps and ts[0] == 999 and ts[-1] == round(1000 / steps) - 1
    assert sampling_timesteps(1000, 1000) == sampling_timesteps(1000, 1000, "leading") == list(range(999, -1, -1))


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {}), ("dpmpp_2m_sde", {})])
def test_callback_sees_every_step(diffusion, name, options):
    """One network call per step, int64 timesteps [B], and the callback sees what the network saw."""
    calls, seen = [], []

    def eps_fn(x, t):
        calls.append((x.clone(), t))
        return gaussian_eps_fn(diffusion)(x, t)

    x_T = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out = SAMPLERS[name](
        eps_fn,
        x_T,
        diffusion,
        7,
        generator=torch.Generator().manual_seed(0),
        spacing="linspace",
        callback=lambda *a: seen.append(a),
        **options,
    )
    assert [i for i, *_ in seen] == list(range(7))
    assert [t for _, t, *_ in seen] == [int(t[0]) for _, t in calls] == sampling_timesteps(1000, 7, "linspace")
    assert all(t.dtype == torch.int64 and t.shape == (3,) for _, t in calls)
    assert torch.equal(seen[0][2], x_T) and all(torch.equal(s[2], c[0]) for s, c in zip(seen, calls))
    torch.testing.assert_close(out, seen[-1][3], rtol=0, atol=1e-12)  # the last step returns its x0 prediction


def test_sampler_keeps_dtype(diffusion):
    x_T = torch.randn(4, 1, 2, 2, dtype=torch.float32)
    for sampler in SAMPLERS.values():
        assert sampler(gaussian_eps_fn(diffusion), x_T, diffusion, 5).dtype == torch.float32


def test_respaced_ddpm_converges(diffusion):
    """With few steps the posterior variance beta-tilde under-disperses (Nichol & Dhariwal 2021,
    section 3.1); the gap must shrink as steps grow, and the mean stays right throughout."""
    gaps = []
    for steps in (10, 50, 250):
        x0 = draw(diffusion, "ddpm", steps, seed=0)
        assert x0.mean() == pytest.approx(MU, abs=0.015)
        gaps.append(SIGMA - x0.std())
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 0.015


# ----------------------------------------------------------------------------- thresholding
def test_threshold_x0_by_hand():
    x0 = torch.tensor([[0.5, -2.0, 1.5, 0.25], [0.1, -0.2, 0.3, -0.4]])
    assert torch.equal(threshold_x0(x0, "none"), x0)
    assert torch.equal(threshold_x0(x0, "clip"), torch.tensor([[0.5, -1.0, 1.0, 0.25], [0.1, -0.2, 0.3, -0.4]]))
    # Row 1: |x0| sorted 0.25 0.5 1.5 2.0; the 2/3 quantile sits at position 3 * 2/3 = 2: s = 1.5.
    # Row 2: every |x0| < 1, so s = max(0.4, 1) = 1 and nothing changes.
    expected = torch.tensor([[0.5 / 1.5, -1.0, 1.0, 0.25 / 1.5], [0.1, -0.2, 0.3, -0.4]])
    torch.testing.assert_close(threshold_x0(x0, "dynamic", percentile=2 / 3), expected)
    # Imagen's p = 99.5% over 200 pixels |x0| = 0.00, 0.01, ..., 1.99 (image shape [1, 10, 20]):
    # position 199 * 0.995 = 198.005, so s = 1.98 + 0.005 * 0.01 = 1.98005.
    image = (torch.arange(200, dtype=torch.float64) / 100 * torch.tensor([1.0, -1.0]).repeat(100)).reshape(1, 1, 10, 20)
    images = torch.cat([image, image / 4])  # the second never leaves [-1, 1]
    expected = torch.cat([image.clamp(-1.98005, 1.98005) / 1.98005, image / 4])
    torch.testing.assert_close(threshold_x0(images, "dynamic"), expected)
    with pytest.raises(ValueError, match="threshold"):
        threshold_x0(x0, "static")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_return_the_thresholded_prediction(diffusion, name):
    """Point-mass data at v: x0_hat = v at every step, so the result is threshold(v) exactly."""
    v = torch.tensor([0.5, -2.0, 1.5, 0.25], dtype=torch.float64).reshape(1, 1, 2, 2)
    s = 1.5 + 0.985 * 0.5  # Imagen's 99.5% quantile of |v| = 0.25 0.5 1.5 2.0, at position 3 * 0.995
    expected = {"none": v, "clip": v.clamp(-1, 1), "dynamic": v.clamp(-s, s) / s}
    for mode, want in expected.items():
        x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        got = SAMPLERS[name](
            point_mass_eps_fn(diffusion, v),
            x_T,
            diffusion,
            10,
            threshold=mode,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_thresholded_eps_stays_consistent(diffusion, name):
    """With x0_hat = c at every step, the ODE's solution is x_t = sqrt(ab_t) c + sqrt(1 - ab_t) e with
    e fixed by x_T: it holds only if eps is recomputed from the clipped x0."""
    v = torch.tensor([0.5, -2.0, 1.5, 0.25], dtype=torch.float64).reshape(1, 1, 2, 2)
    c, ab = v.clamp(-1, 1), diffusion.alphas_cumprod
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = (x_T - ab[-1].sqrt() * c) / (1 - ab[-1]).sqrt()
    seen = []
    SAMPLERS[name](
        point_mass_eps_fn(diffusion, v), x_T, diffusion, 10, threshold="clip", callback=lambda *a: seen.append(a)
    )
    for _, t, x_t, x0 in seen:
        torch.testing.assert_close(x_t, ab[t].sqrt() * c + (1 - ab[t]).sqrt() * e, rtol=0, atol=1e-9)
        torch.testing.assert_close(x0, c, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- guidance and seeds
class FakeEncoder:
    """Every prompt's tokens are filled with its id: what reaches the network says which prompt it was."""

    ids = {"": 0.0, "3": 1.0, "8": 2.0, "blurry": 3.0}

    def encode(self, prompts):
        tokens = torch.stack([torch.full((8, 4), self.ids[p]) for p in prompts])
        return tokens, tokens[:, 0]


def test_guidance_combines_both_halves_in_one_call(diffusion):
    contexts = []

    def net(x, t, context):  # "eps" = the prompt id, so the guided eps is checkable by hand
        contexts.append(context)
        return context[:, :1, :1, None].expand_as(x).clone()

    cond, uncond = prompt_contexts(FakeEncoder().encode, ["3"], 2, "8")
    x, t = torch.zeros(2, 1, 2, 2), torch.full((2,), 5)
    eps = classifier_free_guidance(net, diffusion, cond, uncond, 3.0)(x, t)
    torch.testing.assert_close(eps, torch.full_like(x, 2.0 + 3.0 * (1.0 - 2.0)))  # u + s (c - u)
    assert len(contexts) == 1 and contexts[0][:, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    eps = classifier_free_guidance(net, diffusion, cond, uncond, 1.0)(x, t)
    assert torch.equal(eps, torch.ones_like(x)) and contexts[-1].shape[0] == 2  # s = 1: conditional only


@pytest.mark.parametrize("negative,expected_id", [("", 0.0), ("blurry", 3.0)])
def test_negative_prompt_replaces_the_unconditional_half(diffusion, negative, expected_id):
    contexts = []

    def net(x, t, context):
        contexts.append(context)
        return gaussian_eps_fn(diffusion)(x, t)

    cond, uncond = prompt_contexts(FakeEncoder().encode, ["3", "8"], 3, negative)
    generate(
        net,
        diffusion,
        cond,
        uncond,
        SamplingOptions(sampler="ddim", steps=4, guidance_scale=5.0, guidance_interval=(0.0, math.inf)),
        image_shape=IMAGE_SHAPE,
        batch_size=4,
    )
    assert len(contexts) == 4 * 2  # 4 steps x 2 batches (4 + 2 images)
    for context in contexts:
        cond_half, uncond_half = context[:, 0, 0].chunk(2)
        assert bool((uncond_half == expected_id).all())
    assert torch.cat([c[: len(c) // 2, 0, 0] for c in contexts[::4]]).tolist() == [1.0] * 3 + [2.0] * 3


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {})])
def test_same_seed_same_images_whatever_the_batch(diffusion, name, options):
    """Image i depends only on (seed, i): identical for batch sizes 1, 3 and 7, guided."""
    eps_fn = gaussian_eps_fn(diffusion)

    def net(x, t, context):  # the context shifts eps, so guidance changes the result
        return eps_fn(x, t) + 0.1 * context[:, :1, :1, None]

    cond, uncond = prompt_contexts(FakeEncoder().encode, ["3"] * 4 + ["8"] * 3, 1, "")
    sampling = SamplingOptions(sampler=name, steps=10, guidance_scale=3.0, **options)
    run = lambda seed, batch: generate(
        net, diffusion, cond, uncond, sampling, image_shape=IMAGE_SHAPE, seed=seed, batch_size=batch
    )
    all_at_once = run(5, 7)
    assert all_at_once.shape == (7, 1, 28, 28)
    for batch in (1, 3, 7):
        torch.testing.assert_close(run(5, batch), all_at_once, rtol=0, atol=1e-6)
    assert (run(6, 7) - all_at_once).abs().max() > 0.1
    first = generate(net, diffusion, cond[:2], uncond, sampling, image_shape=IMAGE_SHAPE, seed=5)
    torch.testing.assert_close(first, all_at_once[:2], rtol=0, atol=1e-6)  # fewer images: same first two


def test_image_generators_differ():
    a = torch.randn(4, generator=image_generator(0, 0))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 1)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 0)))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 0)))
