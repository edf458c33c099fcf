"""Schedules: the teacher's log-SNR grid against the spec's float32 table, EDM's ρ-grid against its formula,
and the flow-matching conversions against an independent single-Gaussian computation."""
import math

import numpy as np
import pytest
import torch

from engine import schedules
from engine.data import GaussianMixture

# docs/spec/cm.md §2.2: float32 values of the N = 16 grid.
SPEC_GRID_16 = [80, 41.253544, 21.273186, 10.969927, 5.6568542, 2.9170661, 1.504241, 0.77569091, 0.39999998,
                0.20626771, 0.10636593, 0.054849643, 0.028284263, 0.014585325, 0.0075212047, 0.0038784544,
                0.0019999999]


def test_logsnr_grid_matches_spec_table():
    f32 = schedules.logsnr_sigmas(16, dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.shape == (17,)
    np.testing.assert_allclose(f32.numpy(), np.array(SPEC_GRID_16, dtype=np.float32), rtol=3e-7)
    f64 = schedules.logsnr_sigmas(16)
    assert f64[0] == 80.0 and f64[-1] == 0.002
    # the reference rounds λ to float32 before exp: |Δλ| ≲ 6.2·2^-24 gives up to ~4e-7 relative in σ
    np.testing.assert_allclose(f64.numpy(), SPEC_GRID_16, rtol=5e-7)
    lam = -torch.log(f64)
    # constant λ-step h = ln(80/0.002)/16 = 0.66228967 (docs/spec/cm.md §2.2)
    np.testing.assert_allclose((lam[1:] - lam[:-1]).numpy(), 0.66228967, rtol=1e-7)
    assert abs(f64[7].item() - 0.77569091) < 1e-7  # the mid-training 2-step evaluation point


def test_logsnr_grid_rejects_bad_ranges():
    with pytest.raises(ValueError, match="positive integer"):
        schedules.logsnr_sigmas(0)
    with pytest.raises(ValueError, match="sigma_max > sigma_min > 0"):
        schedules.logsnr_sigmas(8, sigma_max=0.001, sigma_min=0.002)


def test_karras_grid_formula():
    s = schedules.karras_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0 and s[0] == pytest.approx(80) and s[-2] == pytest.approx(0.002)
    i = np.arange(18)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1].numpy(), ref, rtol=1e-14)
    assert (s[1:] < s[:-1]).all()


def test_time_conversions_round_trip():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    sig = schedules.t_to_sigma(t)
    torch.testing.assert_close(schedules.sigma_to_t(sig), t, rtol=1e-14, atol=0)
    x = torch.randn(50, 3, dtype=torch.float64)
    torch.testing.assert_close(schedules.edm_to_fm(schedules.fm_to_edm(x, t[:, None]), sig[:, None]), x)
    assert schedules.sigma_to_lambda(0.5) == pytest.approx(-math.log(0.5))
    assert schedules.lambda_to_sigma(schedules.sigma_to_lambda(3.0)) == pytest.approx(3.0)


def test_velocity_from_denoiser_matches_single_gaussian_closed_form():
    # y ~ N(μ, s²) per dim, z_t = (1 − t) y + t ε: E[y|z] = μ + (1−t)s²/((1−t)²s² + t²)(z − (1−t)μ),
    # E[ε|z] = (z − (1 − t) E[y|z]) / t, v = E[ε − y | z]. Independent of the EDM route the engine takes.
    mu, s = torch.tensor([[0.3, -0.6]], dtype=torch.float64), 0.25
    gm = GaussianMixture(mu, s)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tt = t[:, None]
    Ey = mu + (1 - tt) * s ** 2 / ((1 - tt) ** 2 * s ** 2 + tt ** 2) * (z - (1 - tt) * mu)
    Ee = (z - (1 - tt) * Ey) / tt
    torch.testing.assert_close(gm.velocity(z, t), Ee - Ey, rtol=1e-12, atol=1e-12)
    # and back: the denoiser implied by that velocity is the mixture's own denoiser
    x, sig = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.1, 1.0, 5.0, 40.0], dtype=torch.float64)
    D = schedules.edm_denoiser_from_velocity(gm.velocity, x, sig)
    torch.testing.assert_close(D, gm.denoise(x, sig), rtol=1e-10, atol=1e-12)
