"""The gradient-bias probe (engine/metrics/gradient_bias.py), the per-sample exact flow it uses, and the seed
statistics (engine/pipelines/seed_stats.py)."""
import math

import pytest
import torch

from engine.data import GaussianMixture
from engine.metrics.gradient_bias import BiasProbe, unbiased_squared_norm
from engine.networks import build_network
from engine.objectives import ECT
from engine.pipelines.seed_stats import mean_se, paired_interval, sample_std, seed_table
from engine.precond import CMPrecond
from engine.solvers import pf_ode_reference


def test_per_sample_flow_equals_one_solve_per_row():
    """pf_ode_reference with one starting level per row equals solving each row on its own (float64 rounding)."""
    gm = GaussianMixture.random(4, (2,), std=0.1, seed=0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    sig = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    both = pf_ode_reference(gm.denoise, x, sig, 0.002, 200)
    for i in range(5):
        one = pf_ode_reference(gm.denoise, x[i:i + 1], float(sig[i]), 0.002, 200)
        torch.testing.assert_close(both[i:i + 1], one, rtol=1e-12, atol=1e-12)
    assert torch.equal(both[0], x[0])                                  # σ_from = σ_to: the identity
    with pytest.raises(ValueError, match="sigma_from has shape"):
        pf_ode_reference(gm.denoise, x, sig[:3], 0.002, 10)


def test_paired_norm_estimate_is_unbiased_where_the_plug_in_is_not():
    """μ = 0 with noisy batch means: the paired estimate is 0 within its standard error, while the plug-in
    ‖batch mean‖² averages tr Σ = 50; for μ ≠ 0 the paired estimate finds ‖μ‖² = 4."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 50, generator=g, dtype=torch.float64)
    est, se = unbiased_squared_norm(noise)
    assert abs(est) < 4 * se and se < 0.5
    assert noise.square().sum(1).mean() == pytest.approx(50, rel=0.05)
    mu = torch.zeros(50, dtype=torch.float64)
    mu[:4] = 1.0
    est, se = unbiased_squared_norm(noise + mu)
    assert abs(est - 4.0) < 4 * se
    with pytest.raises(ValueError, match="even number"):
        unbiased_squared_norm(noise[:3])


def _probe_and_net():
    gm = GaussianMixture.random(4, (2,), std=0.1, seed=0)
    probe = BiasProbe(gm, batches=2, batch_size=64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1)).double().eval()
    return probe, net


def test_differences_are_the_oracle_minus_the_consistency_gradient():
    """Each row of `differences` equals ∇L_or − ∇L_CM of that batch, each loss differentiated on its own by
    autograd with the consistency target detached; ECT's r = 0 rows take y as their target."""
    probe, net = _probe_and_net()
    gap = ECT(q=4).t_to_r                     # Δt = 1/4: a coarse gap, with r = 0 for the smallest t
    d = probe.differences(net, gap)
    params = list(net.parameters())
    for k, b in enumerate(probe.batches):
        r = gap(b.t)
        assert (r == 0).any() and (r > 0).any()
        x_t = b.y + b.t[:, None] * b.eps
        with torch.no_grad():
            f_r = net(b.y + r[:, None] * b.eps, torch.where(r > 0, r, b.t))
            f_r[r == 0] = b.y[r == 0]
        f_t = lambda: net(x_t, b.t)  # noqa: E731
        g_or = torch.autograd.grad((f_t() - b.psi).square().sum(1).mean(), params)
        g_cm = torch.autograd.grad((f_t() - f_r).square().sum(1).mean(), params)
        ref = torch.cat([(a - c).reshape(-1) for a, c in zip(g_or, g_cm)])
        torch.testing.assert_close(d[k], ref, rtol=1e-10, atol=1e-12)


def test_bias_tends_to_the_oracle_gradient_as_the_gap_closes():
    """∇L_CM vanishes with the gap: at Δt = 1e-9 the differences equal the oracle gradients."""
    probe, net = _probe_and_net()
    torch.testing.assert_close(probe.differences(net, ECT(q=1e9).t_to_r), probe.oracle_gradients(net),
                               rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="every t to some r"):
        probe.differences(net, lambda t: t)


def test_psi_is_the_exact_flow():
    """The probe's targets are the float64 PF-ODE flow from each (x_t, t) to σ_min (finer solve: same)."""
    probe, _ = _probe_and_net()
    b = probe.batches[0]
    x_t = b.y + b.t[:, None] * b.eps
    gm = GaussianMixture.random(4, (2,), std=0.1, seed=0)
    torch.testing.assert_close(b.psi, pf_ode_reference(gm.denoise, x_t, b.t, 0.002, 2000), rtol=1e-7, atol=1e-7)


def test_seed_statistics():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3))
    assert sample_std([1.0, 2.0, 3.0]) == pytest.approx(1.0) and math.isnan(sample_std([4.0]))
    tie = paired_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])          # d = 1, 2, 3: t(0.975, 2) = 4.303
    assert tie["verdict"] == "tie" and tie["low"] == pytest.approx(2 - 4.302653 / math.sqrt(3), rel=1e-6)
    summary = {"a": {"x": dict(mean=2.0, std=1.0)}, "b": {"x": dict(mean=4.0, std=2.0)}}
    assert seed_table(summary, ["a", "b"], {"x": "X"}, "std", [("vs a", "a", {"b": {"x": tie}})]) == (
        "| arm | X | vs a |\n|---|---|---|\n| a | 2 ± 1 | – |\n"
        f"| b | 4 ± 2 | x: 2 [{tie['low']:.3g}, {tie['high']:.3g}] (tie) |")
    assert paired_interval([1.1, 1.0, 1.2], [0.1, 0.05, 0.12])["verdict"] == "a > b"
    assert paired_interval([0.1], [0.2])["verdict"] == "one seed"
    with pytest.raises(ValueError, match="equal, non-zero"):
        paired_interval([1.0], [1.0, 2.0])
