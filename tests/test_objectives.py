"""Objectives against direct float64 re-computations of the spec's formulas (docs/spec/cm.md §1.1, §3.1, §4.1, §4.5),
on the analytic Gaussian-mixture teacher, a float64 MLP student and a probe student that records its inputs."""
import math

import pytest
import torch
from torch import nn

from engine.data import GaussianMixture
from engine.networks import build_network
from engine.networks.dropout import dropout_generator
from engine.objectives import (CMT, ECD, ECT, KD, EDMLoss, SlowCMT, StepRNG, l2, perceptual, pseudo_huber,
                               resolve_distance, squared_l2)
from engine.precond import CMPrecond, EDMPrecond
from engine.schedules import logsnr_sigmas
from engine.solvers import dpm_solver_pp, pf_ode_reference

F64 = torch.float64
DIM = 3


def make_rng(seed: int) -> StepRNG:
    """Two identically seeded StepRNGs replay the same draws: the tests recompute from a twin."""
    return StepRNG(device=torch.Generator().manual_seed(seed), cpu=torch.Generator().manual_seed(seed + 1000))


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(4, (DIM,), std=0.1, seed=3)


def data(gm, n, seed=0):
    return gm.sample(n, generator=torch.Generator().manual_seed(seed))


class Probe(nn.Module):
    """A student f(x, σ) = w·x + 0.01·σ that records every call's inputs and output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.9, dtype=F64))
        self.calls = []

    def forward(self, x, sigma, labels=None):
        out = self.w * x + 0.01 * sigma.reshape(-1, *([1] * (x.ndim - 1)))
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma.detach().clone(), labels=labels, out=out))
        return out

    @staticmethod
    def f(x, sigma):
        return 0.9 * x + 0.01 * sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Recorder(nn.Module):
    """Wraps a real student and records its outputs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.outs = net, []

    def forward(self, x, sigma, labels=None):
        out = self.net(x, sigma, labels)
        self.outs.append(out)
        return out


def mlp_student(dropout=0.0, seed=0, residual=True):
    torch.manual_seed(seed)
    net = CMPrecond(build_network("gmm-mlp", in_channels=DIM, out_channels=DIM, hidden_channels=32, num_blocks=2,
                                  noise_channels=16, emb_channels=32, dropout=dropout, residual=residual)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # leave the near-zero init: make F non-trivial so every comparison is meaningful
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    return net.train()


# ---- distances -------------------------------------------------------------------------------------------------

def test_distances_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g, dtype=F64)
    d2 = torch.tensor([((x[i] - y[i]) ** 2).sum().item() for i in range(5)], dtype=F64)
    torch.testing.assert_close(squared_l2(x, y), d2, rtol=1e-14, atol=0)
    torch.testing.assert_close(l2(x, y), d2.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(pseudo_huber(0.03)(x, y), (d2 + 0.03 ** 2).sqrt() - 0.03, rtol=1e-14, atol=0)
    # reference names (docs/spec/cm.md §3.1 step 9): 'MSE' is the sum of squares, 'MAE' the L2 norm
    assert resolve_distance("MSE") is squared_l2 and resolve_distance("mae") is l2
    assert resolve_distance("squared_l2") is squared_l2 and resolve_distance("l2") is l2
    # a perceptual module returning [N,1,1,1] (as LPIPS does) becomes [N]
    lp = perceptual(lambda a, b: (a - b).abs().sum(dim=(1, 2)).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(lp(x, y), (x - y).abs().sum(dim=(1, 2)))
    plain = resolve_distance(lambda a, b: (a - b).abs().flatten(1).amax(1).reshape(-1, 1))
    torch.testing.assert_close(plain(x, y), (x - y).abs().flatten(1).amax(1))


def test_l2_gradient_is_zero_not_nan_at_equal_inputs():
    x = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    l2(x, torch.zeros(3, 4, dtype=F64)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_distance_errors():
    with pytest.raises(ValueError, match="unknown distance 'lpipz'"):
        resolve_distance("lpipz")
    with pytest.raises(ValueError, match="perceptual"):
        resolve_distance("LPIPS")
    with pytest.raises(TypeError):
        resolve_distance(3.0)
    with pytest.raises(ValueError, match="c > 0"):
        pseudo_huber(0.0)
    bad = resolve_distance(lambda a, b: (a - b).flatten())
    with pytest.raises(ValueError, match="for 2 pairs"):
        bad(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="different shapes"):
        l2(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- EDM -----------------------------------------------------------------------------------------------------

def test_edm_loss_matches_formula(gm):
    torch.manual_seed(0)
    net = EDMPrecond(build_network("gmm-mlp", in_channels=DIM, out_channels=DIM, hidden_channels=32, num_blocks=2,
                                   noise_channels=16, emb_channels=32)).double().train()
    y = data(gm, 6)
    out = EDMLoss()(net, y, None, make_rng(5))
    twin = make_rng(5)
    sigma = torch.exp(torch.randn(6, generator=twin.device, dtype=F64) * 1.2 - 1.2)
    n = torch.randn(y.shape, generator=twin.device, dtype=F64)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    with torch.no_grad():
        D = net(y + sigma[:, None] * n, sigma)
    ref = torch.stack([(lam[i] * (D[i] - y[i]) ** 2).sum() for i in range(6)])
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-12, atol=0)
    assert (out.pairs, out.student_forward, out.student_backward, out.teacher_nfe) == (6, 6, 6, 0)
    out.loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ---- CMT -----------------------------------------------------------------------------------------------------

def test_cmt_pairing_layout_matches_reference(gm):
    N, m = 6, 3
    y = data(gm, m)
    probe = Probe()
    obj = CMT(gm, nfe=N, trajectories_per_batch=m, distance="squared_l2")
    out = obj(probe, y, None, make_rng(11))
    # recompute docs/spec/cm.md §3.1: ε from the same generator, x_T = y + 80ε, 6-step DPM-Solver++ on the λ grid
    eps = torch.randn(y.shape, generator=make_rng(11).device, dtype=F64)
    x_T = y + 80.0 * eps
    sig = logsnr_sigmas(N)
    traj = dpm_solver_pp(gm, x_T, sig, order=3)
    assert len(probe.calls) == 1
    X, tau = probe.calls[0]["x"], probe.calls[0]["sigma"]
    for j in range(N):
        for b in range(m):
            assert torch.equal(X[j * m + b], traj[j][b])          # step-major: entry j·m + b = x_j[b]
            assert tau[j * m + b].item() == sig[j].item()          # σ_j, the last grid point dropped
    assert torch.equal(X[:m], x_T)                                 # the first m inputs are x_T itself
    Y = torch.cat([traj[N]] * N)
    torch.testing.assert_close(out.loss.detach(), ((Probe.f(X, tau) - Y) ** 2).sum(1), rtol=1e-14, atol=0)
    assert (out.pairs, out.teacher_nfe, out.student_forward, out.student_backward) == (N * m,) * 4


def test_cmt_prior_noise_and_labels():
    gmc = GaussianMixture.random(4, (DIM,), seed=1, num_classes=2)
    N, m = 4, 4
    y, labels = gmc.sample(m, generator=torch.Generator().manual_seed(2), labels=torch.tensor([0, 1, 1, 0]),
                           return_labels=True)
    probe = Probe()
    out = CMT(gmc, nfe=N, trajectories_per_batch=m, prior="noise", distance="l2")(probe, y, labels, make_rng(4))
    x_T = 80.0 * torch.randn(y.shape, generator=make_rng(4).device, dtype=F64)   # data-free start
    traj = dpm_solver_pp(gmc, x_T, logsnr_sigmas(N), labels=labels)              # the teacher sees the labels
    call = probe.calls[0]
    assert torch.equal(call["x"], traj[:N].reshape(N * m, DIM))
    assert torch.equal(call["labels"], labels.repeat(N))                         # labels tiled step-major
    ref = (Probe.f(call["x"], call["sigma"]) - traj[N].repeat(N, 1)).norm(dim=1)
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-13, atol=0)


def test_cmt_mlp_student_loss_and_gradients(gm):
    N, m = 4, 2
    net = mlp_student()
    y = data(gm, m)
    out = CMT(gm, nfe=N, trajectories_per_batch=m, distance=pseudo_huber(0.01))(net, y, None, make_rng(8))
    x_T = y + 80 * torch.randn(y.shape, generator=make_rng(8).device, dtype=F64)
    sig = logsnr_sigmas(N)
    traj = dpm_solver_pp(gm, x_T, sig)
    with torch.no_grad():
        S = net(traj[:N].reshape(-1, DIM), sig[:N].repeat_interleave(m))
    ref = ((S - traj[N].repeat(N, 1)).square().sum(1) + 1e-4).sqrt() - 0.01
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-12, atol=0)
    out.loss.mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


def test_cmt_with_lpips_distance_on_images():
    """The reference's setting on images [N, 3, 16, 16]: LPIPS (random weights, engine.perceptual.lpips) as the distance."""
    from engine.perceptual.lpips import LPIPS
    lp = LPIPS.random(seed=0)
    gmi = GaussianMixture.random(3, (3, 16, 16), std=0.2, seed=2)
    N, m = 2, 2
    y = gmi.sample(m, generator=torch.Generator().manual_seed(0)).float()
    probe = Probe().float()
    out = CMT(gmi, nfe=N, trajectories_per_batch=m, distance=perceptual(lp))(probe, y, None, make_rng(1))
    x_T = y + 80 * torch.randn(y.shape, generator=make_rng(1).device)
    traj = dpm_solver_pp(gmi, x_T, logsnr_sigmas(N))
    X, tau = probe.calls[0]["x"], probe.calls[0]["sigma"]
    assert torch.equal(X, traj[:N].reshape(N * m, 3, 16, 16))
    with torch.no_grad():
        ref = lp(probe.w.detach() * X + 0.01 * tau.reshape(-1, 1, 1, 1), traj[N].repeat(N, 1, 1, 1))
    torch.testing.assert_close(out.loss.detach(), ref.reshape(-1))
    out.loss.mean().backward()
    assert torch.isfinite(probe.w.grad) and probe.w.grad != 0


def test_cmt_batch_size_errors(gm):
    obj = CMT(gm, trajectories_per_batch=8, distance="l2")
    assert obj.images_per_step(128) == 8
    with pytest.raises(ValueError, match=r"8 × 16 = 128 .* batch_size is 100"):
        obj.images_per_step(100)
    with pytest.raises(ValueError, match="trajectories_per_batch"):
        CMT(gm, trajectories_per_batch=0, distance="l2")
    with pytest.raises(ValueError, match="prior"):
        CMT(gm, prior="uniform", distance="l2")
    with pytest.raises(ValueError, match="unknown distance"):
        CMT(gm, distance="ssim")
    with pytest.raises(TypeError):
        CMT(gm)  # no default distance: the reference's LPIPS needs weights the caller provides
    with pytest.raises(ValueError, match="empty batch"):
        CMT(gm, nfe=2, trajectories_per_batch=1, distance="l2")(Probe(), torch.zeros(0, DIM, dtype=F64), None,
                                                                 make_rng(0))


def test_teacher_is_frozen():
    teacher = EDMPrecond(build_network("gmm-mlp", in_channels=DIM, out_channels=DIM, hidden_channels=8,
                                       num_blocks=1, noise_channels=8, emb_channels=8)).train()
    CMT(teacher, distance="l2")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ---- KD and Slow CMT -------------------------------------------------------------------------------------------

def test_kd_target_is_independent_solve(gm):
    N, m = 5, 4
    y = data(gm, m)
    probe = Probe()
    obj = KD(gm, nfe=N, distance="squared_l2")
    assert obj.images_per_step(4) == 4
    out = obj(probe, y, None, make_rng(2))
    x_T = y + 80 * torch.randn(y.shape, generator=make_rng(2).device, dtype=F64)
    target = dpm_solver_pp(gm, x_T, logsnr_sigmas(N))[N]
    call = probe.calls[0]
    assert torch.equal(call["x"], x_T) and (call["sigma"] == 80.0).all()
    torch.testing.assert_close(out.loss.detach(), ((Probe.f(x_T, call["sigma"]) - target) ** 2).sum(1),
                               rtol=1e-14, atol=0)
    assert (out.pairs, out.teacher_nfe, out.student_forward, out.student_backward) == (m, N * m, m, m)


def test_slow_cmt_each_pair_has_its_own_solve(gm):
    N, B = 4, 7
    y = data(gm, B)
    probe = Probe()
    out = SlowCMT(gm, nfe=N, distance="squared_l2")(probe, y, None, make_rng(6))
    twin = make_rng(6)
    o = int(torch.randint(0, N, (1,), generator=twin.cpu).item())
    j = [(i + o) % N for i in range(B)]
    assert sorted(j) == sorted([k % N for k in range(B)])   # stratified: every level, counts differ by ≤ 1
    eps = torch.randn(y.shape, generator=twin.device, dtype=F64)
    sig = logsnr_sigmas(N)
    call = probe.calls[0]
    for i in range(B):
        x_i = y[i] + sig[j[i]] * eps[i]                      # forward noising at σ_{j_i}
        torch.testing.assert_close(call["x"][i], x_i, rtol=0, atol=0)
        assert call["sigma"][i].item() == sig[j[i]].item()
        target = dpm_solver_pp(gm, x_i[None], sig[j[i]:])[-1, 0]   # a solve of N − j_i steps, alone
        ref = ((Probe.f(x_i[None], sig[j[i]:j[i] + 1]) - target) ** 2).sum()
        torch.testing.assert_close(out.loss[i].detach(), ref, rtol=1e-12, atol=1e-14)
    assert out.teacher_nfe == sum(N - k for k in j) and out.pairs == B


# ---- ECT -----------------------------------------------------------------------------------------------------

def ect_draws(seed, B, shape, P_mean=-1.1, P_std=2.0):
    twin = make_rng(seed)
    t = torch.exp(P_mean + P_std * torch.randn(B, generator=twin.device, dtype=F64))
    eps = torch.randn(shape, generator=twin.device, dtype=F64)
    return t, eps, twin.seed()


def test_ect_t_r_and_loss_match_formula(gm):
    B = 16
    y = data(gm, B)
    probe = Probe()
    out = ECT(q=4096)(probe, y, None, make_rng(1))
    t, eps, _ = ect_draws(1, B, y.shape)
    d = 1 / 4096
    r = (t * (1 - d * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0)
    assert (r > 0).all()                                    # q > 5: the r = 0 fallback never triggers
    x_t, x_r = y + t[:, None] * eps, y + r[:, None] * eps
    (ct, cr) = probe.calls
    assert torch.equal(ct["x"], x_t) and torch.equal(ct["sigma"], t)
    torch.testing.assert_close(cr["x"], x_r, rtol=0, atol=0)
    torch.testing.assert_close(cr["sigma"], r, rtol=0, atol=0)
    ref = (Probe.f(x_t, t) - Probe.f(x_r, r)).norm(dim=1) / (t - r)
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-12, atol=0)
    assert (out.pairs, out.teacher_nfe, out.student_forward, out.student_backward) == (B, 0, 2 * B, B)


def test_ect_example_weights_from_spec():
    t = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    ect = ECT(q=4096)
    w = ect.weight(t, ect.t_to_r(t))
    # closed form: 1/(t − r) = q / (t (1 + 8 sigmoid(−t)))
    torch.testing.assert_close(w, 4096 / (t * (1 + 8 * torch.sigmoid(-t))), rtol=1e-9, atol=0)
    assert round(w[0].item()) == 409_928 and round(w[1].item(), 1) == 1299.7 and round(w[2].item(), 1) == 51.2
    for q, w80 in ((1024, 12.8), (512, 6.4)):
        e = ECT(q=q)
        assert round(e.weight(t[2:], e.t_to_r(t[2:])).item(), 1) == w80
    snr = ECT(weighting="snrpk").weight(t, t)
    torch.testing.assert_close(snr, (t ** 2 + 0.25) / (t * 0.5) ** 2)
    const = ECT(q=64, mapping="const")
    torch.testing.assert_close(const.t_to_r(t), t * (1 - 1 / 64))


def test_ect_stage_schedule():
    ect = ECT(q=2, double_kimg=1.0)
    t = torch.tensor([0.5, 3.0, 20.0], dtype=F64)
    for nimg, stage in ((0, 0), (999, 0), (1000, 1), (1999, 1), (2500, 2)):
        ect.set_progress(nimg)
        d = 2.0 ** -(stage + 1)
        assert ect.stage == stage and ect.log_values() == dict(stage=stage, gap_d=d)
        torch.testing.assert_close(ect.t_to_r(t), (t * (1 - d * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0))
    assert ect.state_dict() == dict(stage=2)
    other = ECT(q=2, double_kimg=1.0)
    other.load_state_dict(ect.state_dict())
    assert other.stage == 2
    ect = ECT(q=2, double_kimg=3.2)                          # 3.2 · 1000 is 3200.0000000000005 in floats
    ect.set_progress(3200)
    assert ect.stage == 1
    ect = ECT(q=2, double_kimg=3200)                         # original ECT: 250 ticks of 12.8 kimg
    ect.set_progress(3_200_000 - 128)
    assert ect.stage == 0 and ect.d == 0.5
    with pytest.raises(ValueError, match="double_kimg"):
        ECT(double_kimg=0)
    constant = ECT(q=4096)                                  # CMT post-training: stage 0 throughout
    constant.set_progress(10 ** 9)
    assert constant.stage == 0 and constant.d == 1 / 4096


def test_ect_r_zero_falls_back_to_data(gm):
    B = 32
    y = data(gm, B)
    probe = Probe()
    out = ECT(q=2)(probe, y, None, make_rng(3))              # stage 0, q = 2: r = 0 whenever t < ln 7
    t, eps, _ = ect_draws(3, B, y.shape)
    r = (t * (1 - 0.5 * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0)
    zero = r == 0
    assert zero.any() and (~zero).any()
    assert torch.equal(zero, t < math.log(7))
    x_t, x_r = y + t[:, None] * eps, y + r[:, None] * eps
    target = torch.where(zero[:, None], y, Probe.f(x_r, r))
    ref = (Probe.f(x_t, t) - target).norm(dim=1) / (t - r)
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-12, atol=0)
    # with a real student: no non-finite value anywhere although σ = 0 rows exist
    net = Recorder(mlp_student(dropout=0.2))
    out = ECT(q=2)(net, y, None, make_rng(3))
    assert torch.isfinite(out.loss).all() and all(torch.isfinite(o).all() for o in net.outs)


def test_ect_target_pass_shares_dropout_masks(gm):
    B = 8
    y = data(gm, B)
    net = Recorder(mlp_student(dropout=0.5, residual=False))
    # r == t exactly (d = 1e-30 vanishes in 1 − d): with identical masks the two passes must agree bitwise
    ECT(q=1e30, mapping="const")(net, y, None, make_rng(9))
    S_t, S_r = net.outs
    assert S_t.requires_grad and not S_r.requires_grad
    assert torch.equal(S_t.detach(), S_r)
    # dropout is really active: another mask stream changes the output
    t, eps, seed = ect_draws(9, B, y.shape)
    with dropout_generator(seed + 1), torch.no_grad():
        other = net.net(y + t[:, None] * eps, t)
    assert not torch.allclose(other, S_r)


def test_ect_gradient_flows_only_through_student_pass(gm):
    B = 8
    y = data(gm, B)
    net = mlp_student(dropout=0.3, seed=1)
    out = ECT(q=64, c=0.05)(net, y, None, make_rng(12))
    out.loss.mean().backward()
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    t, eps, seed = ect_draws(12, B, y.shape)
    r = (t * (1 - (1 + 8 * torch.sigmoid(-t)) / 64)).clamp(min=0)
    x_t, x_r = y + t[:, None] * eps, y + r[:, None] * eps

    def manual(detach_target: bool):
        with dropout_generator(seed):
            S_t = net(x_t, t)
        with dropout_generator(seed), torch.set_grad_enabled(not detach_target):
            S_r = net(x_r, r)
        loss = ((((S_t - S_r) ** 2).sum(1) + 0.05 ** 2).sqrt() - 0.05) / (t - r)
        net.zero_grad()
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    loss_sg, grads_sg = manual(True)
    torch.testing.assert_close(out.loss.detach(), loss_sg, rtol=1e-10, atol=0)
    for a, b in zip(ours, grads_sg):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    _, grads_full = manual(False)   # differentiating through the target too would give other gradients
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=0) for a, b in zip(ours, grads_full))


def test_ect_argument_errors():
    with pytest.raises(ValueError, match="mapping"):
        ECT(mapping="linear")
    with pytest.raises(ValueError, match="weighting"):
        ECT(weighting="uniform")
    with pytest.raises(ValueError, match="q must be"):
        ECT(q=1)
    with pytest.raises(ValueError, match="not both"):
        ECT(c=0.1, distance="l2")


# ---- ECD -----------------------------------------------------------------------------------------------------

def test_ecd_euler_and_heun_targets(gm):
    B = 32
    y = data(gm, B)
    t, eps, _ = ect_draws(5, B, y.shape)
    r = (t * (1 - 0.25 * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0)    # ECD default q = 4
    zero = r == 0
    assert zero.any() and (~zero).any()
    x_t = y + t[:, None] * eps
    tb, rb = t[:, None], r[:, None]
    d = (x_t - gm(x_t, t)) / tb
    euler = x_t + (rb - tb) * d
    xp = euler
    d2 = (xp - gm(xp, r.clamp(min=1e-30))) / rb
    heun = x_t + (rb - tb) * (d + d2) / 2
    for solver, x_r, nfe in (("euler", euler, B), ("heun", heun, 2 * B)):
        probe = Probe()
        out = ECD(gm, solver=solver)(probe, y, None, make_rng(5))
        cr = probe.calls[1]
        torch.testing.assert_close(cr["x"][~zero], x_r[~zero], rtol=1e-13, atol=1e-13)
        assert torch.isfinite(cr["x"]).all()
        target = torch.where(zero[:, None], y, Probe.f(x_r, r))
        w = (t ** 2 + 0.25) / (t * 0.5) ** 2                              # snrpk weighting by default
        ref = (Probe.f(x_t, t) - target).norm(dim=1) * w
        torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-12, atol=0)
        assert (out.teacher_nfe, out.student_forward, out.student_backward) == (nfe, 2 * B, B)


def test_ecd_auto_guidance():
    gm_ref, gm_guide = GaussianMixture.random(4, (DIM,), seed=3), GaussianMixture.random(3, (DIM,), seed=7)
    ecd = ECD(gm_ref, guide=gm_guide, guidance=2.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, DIM, generator=g, dtype=F64)
    t, r = torch.full((5,), 2.0, dtype=F64), torch.full((5,), 1.5, dtype=F64)
    D = gm_guide(x, t) + 2.05 * (gm_ref(x, t) - gm_guide(x, t))
    torch.testing.assert_close(ecd.teacher_step(x, t, r), x + (r - t)[:, None] * (x - D) / 2.0, rtol=1e-13, atol=0)
    out = ecd(Probe(), data(gm_ref, 5), None, make_rng(0))
    assert out.teacher_nfe == 2 * 5
    with pytest.raises(ValueError, match="both guide"):
        ECD(gm_ref, guide=gm_guide)
    with pytest.raises(ValueError, match="solver"):
        ECD(gm_ref, solver="rk4")


def test_ecd_step_converges_to_exact_ode_solution(gm):
    """One step's local error is O(h²) for Euler (first order) and O(h³) for Heun (second order)."""
    x0 = data(gm, 16, seed=4)
    t0 = 1.0
    x_t = x0 + t0 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.full((16,), t0, dtype=F64)
    hs = [0.2, 0.1, 0.05, 0.025]
    exact = [pf_ode_reference(gm, x_t, t0, t0 - h, steps=50) for h in hs]   # RK4: error ~1e-10, far below
    slopes = {}
    for solver in ("euler", "heun"):
        ecd = ECD(gm, solver=solver)
        errs = [(ecd.teacher_step(x_t, t, t - h) - ref).abs().max().item() for h, ref in zip(hs, exact)]
        slopes[solver] = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
    assert all(1.7 < s < 2.3 for s in slopes["euler"]), slopes
    assert all(2.7 < s < 3.3 for s in slopes["heun"]), slopes
