"""sCT / sCD (engine/objectives/scm.py) against direct float64 re-computations of docs/spec/mf.md §5.2: the TrigFlow
view
of an EDM denoiser, the JVP tangent against central finite differences, the whole loss, shared dropout masks,
the teacher velocity on the analytic mixture, warm-up, and the adaptive weight trained by the loop."""
import math

import torch

from engine.data import GaussianMixture
from engine.data.sampler import TensorSource
from engine.networks import build_network
from engine.networks.dropout import dropout_generator
from engine.objectives import SCD, SCT, StepRNG
from engine.objectives.scm import trig_F
from engine.precond import CMPrecond
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig

SD = 0.5


def mlp(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return CMPrecond(build_network("gmm-mlp", hidden_channels=32, num_blocks=2, dropout=dropout)).double().train()


def test_trigflow_view_of_the_denoiser_is_the_consistency_function():
    net = mlp()
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0.05, 1.5, 6, dtype=torch.float64)
    f = torch.cos(t)[:, None] * x_t - torch.sin(t)[:, None] * SD * trig_F(net, x_t, t, None, SD)
    torch.testing.assert_close(f, net(x_t / torch.cos(t)[:, None], SD * torch.tan(t)), rtol=1e-12, atol=1e-12)


def test_tangent_equals_finite_differences():
    net = mlp()
    obj = SCT()
    obj.r_w = 0.7
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 1.3 + 0.1
    dxdt = torch.randn(5, 2, generator=g, dtype=torch.float64)
    F = lambda x, tt: trig_F(net, x, tt, None, SD)
    with torch.no_grad():
        tangent = obj.tangent(net, x_t, t, dxdt, F(x_t, t), None, seed=0)
    h = 1e-6
    with torch.no_grad():
        dF = (F(x_t + h * dxdt, t + h) - F(x_t - h * dxdt, t - h)) / (2 * h)   # total derivative along the ODE
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        ref = -c ** 2 * (SD * F(x_t, t) - dxdt) - 0.7 * (c * s * x_t + SD * c * s * dF)
    torch.testing.assert_close(tangent, ref, rtol=1e-7, atol=1e-8)


def test_loss_equals_direct_recomputation():
    net = mlp()
    obj = SCT(P_mean=-0.8, P_std=1.6)
    torch.nn.init.normal_(obj.weight.linear.weight, std=0.3)   # a non-trivial w_φ(t)
    obj.weight.double()
    y = torch.randn(7, 2, dtype=torch.float64) * 0.5
    out = obj(net, y, None, StepRNG.for_step(3, 0, 128))

    rng = StepRNG.for_step(3, 0, 128)                             # the same draws, in the same order
    tau = rng.randn([7], "cpu", torch.float64) * 1.6 - 0.8
    t = torch.atan(torch.exp(tau) / SD)
    z = rng.randn(y.shape, "cpu", torch.float64) * SD
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * y + s * z
    dxdt = c * z - s * y
    F = lambda x, tt: trig_F(net, x, tt, None, SD)
    h = 1e-6
    with torch.no_grad():
        dF = (F(x_t + h * dxdt, t + h) - F(x_t - h * dxdt, t - h)) / (2 * h)
        gt = -c ** 2 * (SD * F(x_t, t) - dxdt) - 1.0 * (c * s * x_t + SD * c * s * dF)
        gt = gt / (gt.norm(dim=1, keepdim=True) + 0.1)
        w = obj.weight(t).double()
        # F_θ − F⁻ is zero in value (same weights, same masks): L = e^w·‖g‖²/D − w
        ref = torch.exp(w) * gt.square().sum(1) / 2 - w
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-6, atol=1e-9)
    assert (out.pairs, out.teacher_nfe, out.student_forward, out.student_backward) == (7, 0, 14, 7)
    out.loss.mean().backward()
    assert obj.weight.linear.weight.grad is not None and any(p.grad is not None for p in net.parameters())


def test_dropout_masks_are_shared_between_the_jvp_and_the_gradient_pass():
    """With dropout on, F_θ and F⁻ must see the same masks, or F_θ − F⁻ ≠ 0 and L ≠ ‖g‖²/D at w = 0."""
    net = mlp(dropout=0.5)
    obj = SCT()
    obj.weight.double()
    y = torch.randn(6, 2, dtype=torch.float64)
    rng = lambda: StepRNG.for_step(0, 0, 0)
    out = obj(net, y, None, rng())
    r = rng()
    tau = r.randn([6], "cpu", torch.float64) * 1.4 - 1.0
    t = torch.atan(torch.exp(tau) / SD)
    z = r.randn(y.shape, "cpu", torch.float64) * SD
    seed = r.seed()
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * y + s * z
    with torch.no_grad(), dropout_generator(seed, "cpu"):
        F_minus = trig_F(net, x_t, t, None, SD)
    g = obj.tangent(net, x_t, t, c * z - s * y, F_minus, None, seed)
    n = g.norm(dim=1)
    torch.testing.assert_close(out.loss.detach(), (n / (n + 0.1)) ** 2 / 2, rtol=1e-12, atol=1e-15)


def test_scd_teacher_velocity_is_the_pf_ode_in_trigflow_time():
    """For the exact mixture denoiser, sCD's dx_t/dt equals d/dt of x_t = cos t·x_σ(σ_d tan t) along EDM's
    PF-ODE dx/dσ = (x − D)/σ, derived here by the chain rule."""
    gm = GaussianMixture.random(5, (2,), std=0.2, seed=0)
    obj = SCD(gm.denoise)
    x_t = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0.1, 1.4, 8, dtype=torch.float64)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    sigma = SD * torch.tan(t)
    x_sigma = x_t / c
    dx_dsigma = (x_sigma - gm.denoise(x_sigma, sigma)) / sigma[:, None]
    dsigma_dt = SD / c ** 2
    expected = -s * x_sigma + c * dx_dsigma * dsigma_dt
    torch.testing.assert_close(obj.teacher_velocity(x_t, t, None), expected, rtol=1e-10, atol=1e-10)
    v, nfe = obj.velocity(x_t, t, None, None, None)
    assert nfe == 8
    assert SCD(gm.denoise, guidance=1.0).velocity(x_t, t, None, None, None)[1] == 16


def test_time_proposal_and_warmup():
    obj = SCT(P_mean=-1.0, P_std=1.4, warmup_kimg=2.0)
    t = obj.sample_t(200_000, "cpu", torch.float64, StepRNG.for_step(0, 0, 0))
    tau = torch.log(SD * torch.tan(t))
    assert abs(tau.mean().item() + 1.0) < 0.01 and abs(tau.std().item() - 1.4) < 0.01
    assert (t > 0).all() and (t < math.pi / 2).all()
    assert obj.r_w == 0.0
    obj.set_progress(500)
    assert obj.r_w == 0.25 and obj.log_values() == {"tangent_warmup": 0.25}
    obj.set_progress(10_000)
    assert obj.r_w == 1.0 and SCT().r_w == 1.0


def test_loop_trains_the_adaptive_weight_and_resumes_it(tmp_path):
    data = TensorSource(GaussianMixture.random(4, (2,), seed=0).sample(256, generator=torch.Generator()).float())
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1))
    obj = SCT()
    cfg = StageConfig(name="sct", total_kimg=0.256, batch_size=64, lr=1e-2, ema_beta=None, ema_std=0.1,
                      log_kimg=0.128, ckpt_kimg=0.128, seed=0)
    train_stage(cfg, net, obj, data, str(tmp_path))
    w = obj.weight.linear.weight.detach().clone()
    assert w.abs().sum() > 0  # moved from its zero init: it is in the optimizer
    again = SCT()
    torch.manual_seed(0)   # the same initialisation: a rerun of the same stage
    train_stage(cfg, CMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1)), again, data,
                str(tmp_path))  # finished stage: restored from its last checkpoint
    assert torch.equal(again.weight.linear.weight, w)
