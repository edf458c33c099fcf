"""Solvers against independent references: the spec's difference-form DPM-Solver++ update in float64, a
high-accuracy RK4 solution of the PF-ODE of the analytic Gaussian mixture, and convergence-order slopes."""
import math

import numpy as np
import pytest
import torch

from engine.data import GaussianMixture
from engine.schedules import karras_sigmas, logsnr_sigmas
from engine.solvers import (consistency_sampler, dpm_solver_orders, dpm_solver_pp, dpm_solver_pp_coefficients, euler,
                            flow_heun_trajectory, heun, mean_flow_sampler, mean_flow_trajectory, mean_flow_uniform,
                            pf_ode_reference)


def spec_update(x, t, s0, s1, s2, M0, M1, M2, order):
    """docs/spec/cm.md §2.5 written out in its difference form, float64, independent of the engine's expansion."""
    lam = lambda v: -math.log(v)
    h = lam(t) - lam(s0)
    phi1 = math.expm1(-h)
    out = (t / s0) * x - phi1 * M0
    if order == 1:
        return out
    r0 = (lam(s0) - lam(s1)) / h
    D1_0 = (M0 - M1) / r0
    if order == 2:
        return out - 0.5 * phi1 * D1_0
    r1 = (lam(s1) - lam(s2)) / h
    D1_1 = (M1 - M2) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return out + phi2 * D1 - phi3 * D2


def test_orders_schedule_matches_cmt():
    assert dpm_solver_orders(16) == [1, 2] + [3] * 12 + [2, 1]
    assert dpm_solver_orders(16, lower_order_final=False) == [1, 2] + [3] * 14
    assert dpm_solver_orders(2) == [1, 1] and dpm_solver_orders(3) == [1, 2, 1]
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpm_solver_orders(16, order=4)


def test_expanded_coefficients_equal_difference_form_on_uneven_grid():
    g = torch.Generator().manual_seed(0)
    sig = torch.sort(torch.rand(9, generator=g, dtype=torch.float64) * 20 + 0.01, descending=True).values
    x = torch.randn(6, generator=g, dtype=torch.float64)
    Ms = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3)]
    for order in (1, 2, 3):
        coef, orders = dpm_solver_pp_coefficients(sig, order)
        for k, p in enumerate(orders):
            if k < 2:
                continue
            i = k + 1
            ours = coef[k, 0] * x + coef[k, 1] * Ms[0] + coef[k, 2] * Ms[1] + coef[k, 3] * Ms[2]
            ref = spec_update(x, sig[i].item(), sig[i - 1].item(), sig[i - 2].item(), sig[i - 3].item(),
                              *Ms, order=p)
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


class Counting:
    def __init__(self, fn):
        self.fn, self.sigmas = fn, []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(sigma)
        assert sigma.shape == (x.shape[0],)
        return self.fn(x, sigma, labels)


def test_one_call_per_step_and_trajectory_layout():
    gm = GaussianMixture.random(4, (3,), seed=0)
    den = Counting(gm)
    xT = 80 * torch.randn(5, 3)
    sig = logsnr_sigmas(16)
    traj = dpm_solver_pp(den, xT, sig)
    assert traj.shape == (17, 5, 3) and traj.dtype == torch.float32
    assert torch.equal(traj[0], xT)
    assert len(den.sigmas) == 16  # no call at the final σ, no extra denoise
    np.testing.assert_allclose([s[0].item() for s in den.sigmas], sig[:16].float().numpy())
    buf = torch.empty(17, 5, 3)
    out = dpm_solver_pp(gm, xT, sig, out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, traj)
    with pytest.raises(ValueError, match="trajectory buffer"):
        dpm_solver_pp(gm, xT, sig, out=torch.empty(16, 5, 3))
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpm_solver_pp(gm, xT, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="third_order"):
        dpm_solver_pp(gm, xT, sig, third_order="bogus")


@pytest.fixture(scope="module")
def ode_problem():
    gm = GaussianMixture.random(8, (2,), std=0.2, seed=1)
    xT = 80 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = pf_ode_reference(gm, xT, 80.0, 0.002, steps=2000)
    ref_check = pf_ode_reference(gm, xT, 80.0, 0.002, steps=1000)
    assert (ref - ref_check).abs().max() < 1e-8  # the oracle itself has converged
    return gm, xT, ref


def slopes(errors, ns):
    return [math.log(errors[i] / errors[i + 1]) / math.log(ns[i + 1] / ns[i]) for i in range(len(ns) - 1)]


def fitted_order(errors, ns):
    """Least-squares slope of log error against log NFE (the empirical convergence order)."""
    return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def test_dpm_solver_convergence_orders(ode_problem):
    gm, xT, ref = ode_problem
    ns = [16, 32, 64, 128]
    err = {}
    for key, order, rule in [(1, 1, "upstream"), (2, 2, "upstream"), ("3-upstream", 3, "upstream"),
                             ("3-taylor", 3, "taylor")]:
        err[key] = [rms(dpm_solver_pp(gm, xT, logsnr_sigmas(n), order=order, third_order=rule)[-1], ref)
                    for n in ns]
    p1, p2, p3t = (fitted_order(err[k], ns) for k in (1, 2, "3-taylor"))
    assert 0.9 < p1 < 1.1 and 1.8 < p2 < 2.2, (p1, p2, err)
    # Third order, pulled slightly below 3 by the unavoidable first-order warm-up step (local O(h²) with a
    # small constant at σ = 80): measured ≈ 2.76 over 16–128 NFE here.
    assert 2.6 < p3t < 3.4, (p3t, err["3-taylor"])
    s3u = slopes(err["3-upstream"], ns)
    # The upstream/CMT 3M rule is second order (its D2 term is half the Taylor one), with a smaller constant.
    assert 1.85 < s3u[-1] < 2.3, s3u
    assert all(e3 < e2 for e3, e2 in zip(err["3-upstream"], err[2]))
    # At CMT's operating point (16 NFE) the teacher is accurate to ~1e-3 on data of scale 1.
    assert err["3-upstream"][0] < 5e-3


def test_float32_trajectory_tracks_float64(ode_problem):
    gm, xT, _ = ode_problem
    t64 = dpm_solver_pp(gm, xT, logsnr_sigmas(16))
    t32 = dpm_solver_pp(gm, xT.float(), logsnr_sigmas(16))
    assert t32.dtype == torch.float32
    scale = t64.abs().amax(dim=tuple(range(1, t64.ndim)), keepdim=True)
    assert ((t32.double() - t64).abs() / scale).max() < 1e-5


def test_heun_and_euler_orders(ode_problem):
    gm, xT, ref = ode_problem
    ns = [16, 32, 64]
    grid = lambda n: karras_sigmas(n + 1, append_zero=False)  # n steps from 80 to 0.002
    e_h = [rms(heun(gm, xT, grid(n))[-1], ref) for n in ns]
    e_e = [rms(euler(gm, xT, grid(n))[-1], ref) for n in ns]
    assert all(1.8 < s < 2.3 for s in slopes(e_h, ns)), e_h
    assert all(0.85 < s < 1.15 for s in slopes(e_e, ns)), e_e


def test_heun_counts_calls_and_final_euler_step():
    gm = GaussianMixture.random(3, (2,), seed=2)
    den = Counting(gm)
    traj = heun(den, 80 * torch.randn(4, 2, dtype=torch.float64), karras_sigmas(18))
    assert traj.shape == (19, 4, 2) and len(den.sigmas) == 35  # EDM's 35 NFE for CIFAR-10


def test_consistency_sampler_semantics():
    calls = []

    def f(x, sigma, labels=None):
        calls.append((x.clone(), sigma.clone()))
        return torch.tanh(x) * 0.5

    z = torch.randn(3, 2, dtype=torch.float64)
    one = consistency_sampler(f, z)
    assert len(calls) == 1 and torch.equal(calls[0][0], 80 * z) and torch.all(calls[0][1] == 80)
    torch.testing.assert_close(one, torch.tanh(80 * z) * 0.5)
    calls.clear()
    eps = torch.randn(3, 2, dtype=torch.float64)
    two = consistency_sampler(f, z, mid_sigmas=(0.821,), noise=[eps])
    torch.testing.assert_close(two, torch.tanh(torch.tanh(80 * z) * 0.5 + 0.821 * eps) * 0.5)
    assert torch.all(calls[1][1] == 0.821)
    a = consistency_sampler(f, z, (0.77569,), generator=torch.Generator().manual_seed(3))
    b = consistency_sampler(f, z, (0.77569,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decrease"):
        consistency_sampler(f, z, (90.0,))


def point_mass_flow(c):
    """The exact average velocity of data concentrated at c on the straight path x_t = (1 − t)c + tε:
    u(x_t, r, t) = (x_t − c)/t for every r, so any Mean Flow schedule lands on c exactly."""
    def u(x, t, r, labels=None):
        assert t.shape == r.shape == (x.shape[0],) and (r < t).all()
        return (x - c) / t.reshape(-1, *([1] * (x.ndim - 1)))
    return u


def test_mean_flow_samplers_follow_the_exact_flow():
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = point_mass_flow(c)
    for t_steps in [(1.0,), (1.0, 0.5), (1.0, 0.7, 0.2)]:
        torch.testing.assert_close(mean_flow_sampler(u, eps, t_steps), c.expand(5, 2), rtol=0, atol=1e-14)
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    traj = mean_flow_trajectory(u, eps, ts)
    assert traj.shape == (5, 5, 2)
    for k, t in enumerate(ts):   # every state lies on the path
        torch.testing.assert_close(traj[k], (1 - t) * c + t * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(mean_flow_uniform(u, eps, 4), traj[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="decrease to 0"):
        mean_flow_sampler(u, eps, (0.5, 1.0))


def test_flow_heun_is_second_order_and_counts_calls():
    """dx/dt = −x·cos(t) from t = 1 to 0: x(0) = x(1)·exp(sin 1) exactly. Heun with the final step into 0 left
    Euler (2N − 1 calls) converges with order 2."""
    x1 = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    exact = x1 * math.exp(math.sin(1.0))
    calls = []

    def v(x, t):
        calls.append(t)
        return -x * math.cos(t)

    ns = [8, 16, 32, 64]
    errs = []
    for n in ns:
        calls.clear()
        traj = flow_heun_trajectory(v, x1, [k / n for k in range(n, -1, -1)])
        assert traj.shape == (n + 1, 1, 2) and len(calls) == 2 * n - 1 and calls[-1] == 1 / n
        errs.append(float((traj[-1] - exact).abs().max()))
    assert all(1.8 < sl < 2.2 for sl in slopes(errs, ns)), errs
