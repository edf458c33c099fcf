"""The analytic teacher: its closed-form denoiser against Tweedie's formula on its own log-density (autograd),
its sampler against the mixture's moments, and its class-conditional restriction."""

import pytest
import torch

from engine.data import GaussianMixture


def test_denoiser_equals_tweedie_on_log_density():
    gm = GaussianMixture.random(5, (2, 3), std=0.3, seed=0)
    x = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    for sigma in (0.01, 0.3, 2.0, 80.0):
        xr = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(gm.log_prob(xr, sigma).sum(), xr)
        torch.testing.assert_close(gm.denoise(x, sigma), x + sigma ** 2 * grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gm.score(x, sigma), grad, rtol=1e-9, atol=1e-9)


def test_log_density_normalised_in_1d():
    gm = GaussianMixture(torch.tensor([[-0.5], [0.4]]), torch.tensor([0.1, 0.3]), weights=[0.3, 0.7])
    grid = torch.linspace(-4, 4, 40001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 0.5):
        p = gm.log_prob(grid, sigma).exp()
        assert torch.trapezoid(p, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-8)


def test_sampling_moments():
    gm = GaussianMixture(torch.tensor([[-0.5, 0.2], [0.4, -0.1]]), torch.tensor([0.1, 0.3]), weights=[0.3, 0.7])
    y = gm.sample(200_000, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mean = (w[:, None] * gm.means).sum(0)
    second = (w[:, None] * (gm.vars + gm.means ** 2)).sum(0)
    var = second - mean ** 2
    se = (var / 200_000).sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * se).all()
    assert ((y.var(0) - var).abs() / var < 0.02).all()


def test_denoiser_limits_and_dtype():
    gm = GaussianMixture.random(4, (3,), seed=3)
    x = torch.randn(8, 3)
    out = gm(x, torch.full((8,), 0.5))
    assert out.dtype == torch.float32
    # σ → ∞: the posterior mean tends to the data mean
    far = gm.denoise(1e-3 * torch.randn(8, 3, dtype=torch.float64), 1e6)
    torch.testing.assert_close(far, gm.means.mean(0).expand(8, 3), rtol=0, atol=1e-6)
    # σ → 0 at a component mean: the denoiser returns the point itself
    near = gm.denoise(gm.means.clone(), 1e-6)
    torch.testing.assert_close(near, gm.means, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 3\]"):
        gm.denoise(torch.randn(2, 4), 1.0)


def test_class_conditional():
    gm = GaussianMixture(torch.tensor([[-1.0], [1.0]]), 0.1, classes=[0, 1])
    x = torch.zeros(2, 1, dtype=torch.float64)
    d = gm.denoise(x, 1.0, labels=torch.tensor([0, 1]))
    # restricted to one component: μ_k + s²/(s² + σ²)(x − μ_k)
    expect = torch.tensor([[-1 + 0.01 / 1.01], [1 - 0.01 / 1.01]], dtype=torch.float64)
    torch.testing.assert_close(d, expect)
    y, lab = gm.sample(1000, labels=torch.ones(1000, dtype=torch.long), return_labels=True)
    assert (lab == 1).all() and (y > 0).all()
    with pytest.raises(ValueError, match="no mixture component"):
        gm.denoise(x, 1.0, labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no component classes"):
        GaussianMixture(torch.zeros(2, 1)).denoise(x, 1.0, labels=torch.tensor([0, 0]))
