"""The forward-mode derivatives of engine/jvp.py as the objectives take them (sCT's tangent g, Mean Flow's du/dt):
the central difference against the exact JVP in float64 (its error shrinking as h² until rounding) and in float32
(where the default step FD_STEP sits), and the JVP precision under CPU bf16 autocast against float64 — the tangent's
relative error with and without the float32 pass, at times near both ends. Plus the settings' errors and their
place in a stage's identity."""
import copy
import math

import pytest
import torch
from devices import DEVICES

from engine.errors import EngineError
from engine.jvp import FD_STEP
from engine.networks import DiT, SongUNet
from engine.objectives import SCD, SCT, MeanFlow
from engine.precond import CMPrecond, EDMPrecond
from engine.training.stage_config import describe_object

SD = 0.5


def unet():
    torch.manual_seed(0)
    net = CMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0))
    for p in net.parameters():     # away from the zero-initialised output layer: a non-trivial function
        if p.ndim > 1:
            p.data.normal_(0, 0.2)
    return net


def dit():
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=4)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net


# t spans (0, π/2) with points near both ends, where σ = σ_d·tan t is tiny or huge
T_SCM = torch.tensor([0.01, 0.05, 0.7, 1.0, 1.52, 1.565])
T_MF = torch.tensor([0.002, 0.2, 0.5, 0.7, 0.9, 0.998])


def scm_tangent(obj, net, dtype, autocast=False, device="cpu"):
    """sCT's g (before normalisation, r_w = 1) at fixed points of a trajectory, in `dtype` (bf16 autocast on
    `device` if asked)."""
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(6, 1, 8, 8, generator=g) * 2 - 1).to(device, dtype)
    z = (torch.randn(6, 1, 8, 8, generator=g) * SD).to(device, dtype)
    t = T_SCM.to(device, dtype)
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    x_t, dxdt = c * x0 + s * z, c * z - s * x0
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        return obj.tangent(net.to(device), x_t, t, dxdt, torch.zeros_like(x_t), None, seed=0).double().cpu()


def mf_derivative(obj, net, dtype, autocast=False, device="cpu"):
    """Mean Flow's du/dt along (ṽ, 0, 1) at fixed (z, r, t), in `dtype`."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 1, 8, 8, generator=g).to(device, dtype)
    v = torch.randn(6, 1, 8, 8, generator=g).to(device, dtype)
    t = T_MF.to(device, dtype)
    y = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        return obj.time_derivative(net.to(device), z, 0.3 * t, t, y, v).double().cpu()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def per_sample_rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))


@pytest.mark.parametrize("case", ["sct", "mf"])
def test_finite_difference_error_shrinks_as_h_squared_until_rounding(case):
    """float64: the error against the exact JVP falls 100× per decade of h (second order) from h = 0.1 to 1e-3.
    float32: rounding (∝ 1/h) takes over below the default step — at FD_STEP the error is under 1e-3 and smaller
    than at 1e-4 (the step NVlabs/FastGen uses for Mean Flow) and at 0.1."""
    if case == "sct":
        net = unet()
        exact = scm_tangent(SCT(), copy.deepcopy(net).double(), torch.float64)
        err = lambda h, dtype: rel(scm_tangent(SCT(jvp="fd", fd_step=h), copy.deepcopy(net).to(dtype), dtype), exact)
    else:
        net = dit()
        exact = mf_derivative(MeanFlow(jvp="func"), copy.deepcopy(net).double(), torch.float64)
        err = lambda h, dtype: rel(mf_derivative(MeanFlow(jvp="fd", fd_step=h), copy.deepcopy(net).to(dtype),
                                                 dtype), exact)
    e64 = [err(h, torch.float64) for h in (1e-1, 1e-2, 1e-3)]
    for a, b in zip(e64, e64[1:]):
        assert 60 < a / b < 160, e64                       # ≈ 100: slope 2 on a log-log plot
    assert e64[-1] < 1e-5
    e32 = {h: err(h, torch.float32) for h in (1e-1, FD_STEP, 1e-4)}
    assert e32[FD_STEP] < 1e-3 and e32[FD_STEP] < e32[1e-4] and e32[FD_STEP] < e32[1e-1], e32
    assert e32[1e-4] > 3 * err(1e-4, torch.float64)       # rounding dominates there


def test_scd_and_mean_flow_finite_differences_follow_their_exact_paths():
    """The same central difference behind sCD (the teacher's velocity as the direction) and Mean Flow's dual-stream
    DiT path: at h = 1e-3 in float64 within 1e-5 of the exact JVP."""
    net = unet().double()
    teacher = EDMPrecond(unet().model).double().eval()      # the same U-Net as a diffusion denoiser
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) * 0.7
    t = torch.tensor([0.1, 0.6, 1.1, 1.5], dtype=torch.float64)
    exact_obj, fd_obj = SCD(teacher), SCD(teacher, jvp="fd", fd_step=1e-3)
    dxdt, _ = exact_obj.velocity(x_t, t, None, None, None)
    with torch.no_grad():
        a = exact_obj.tangent(net, x_t, t, dxdt, torch.zeros_like(x_t), None, 0)
        b = fd_obj.tangent(net, x_t, t, dxdt, torch.zeros_like(x_t), None, 0)
    assert rel(b, a) < 1e-5
    d = dit().double()
    assert rel(mf_derivative(MeanFlow(jvp="fd", fd_step=1e-3), d, torch.float64),
               mf_derivative(MeanFlow(jvp="dual"), d, torch.float64)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_jvp_precision_reduces_the_tangent_error_under_bf16_autocast(device):
    """Under bf16 autocast against float64: with jvp_precision='autocast' the tangent inherits bf16 (relative error
    per sample ≈ 1e-2, up to ~8e-2 for sCT near t = π/2, i.e. σ = σ_d·tan t ≈ 80); the float32 pass brings it to
    float32 rounding everywhere, the ends of t included, for the exact and the dual-stream paths: ≤ 1e-5 on the
    CPU; on CUDA ≤ 2e-3, as TF32 convolutions and the Triton attention kernel's TF32 dots allow (their rounding is
    2⁻¹¹). A finite difference of bf16 forwards is refused (it is noise: error above 100%)."""
    tol, factor = (1e-5, 100) if device == "cpu" else (2e-3, 3)
    net = unet()
    ref = scm_tangent(SCT(), copy.deepcopy(net).double(), torch.float64, device=device)
    bf16 = per_sample_rel(scm_tangent(SCT(jvp_precision="autocast"), net, torch.float32, True, device), ref)
    fp32 = per_sample_rel(scm_tangent(SCT(jvp_precision="fp32"), net, torch.float32, True, device), ref)
    assert (fp32 < tol).all(), fp32
    assert (bf16 > factor * fp32).all() and bf16[-2:].min() > 2e-2, (bf16, fp32)      # t near π/2: worst in bf16
    d = dit()
    ref = mf_derivative(MeanFlow(jvp="func"), copy.deepcopy(d).double(), torch.float64, device=device)
    for mode in ("dual", "func"):
        bf16 = per_sample_rel(mf_derivative(MeanFlow(jvp=mode, jvp_precision="autocast"), d, torch.float32, True,
                                            device), ref)
        fp32 = per_sample_rel(mf_derivative(MeanFlow(jvp=mode), d, torch.float32, True, device), ref)
        assert (fp32 < tol).all() and (bf16 > 3e-3).all() and (bf16 > factor * fp32).all(), (mode, bf16, fp32)
    with pytest.raises(EngineError, match="jvp='fd' needs jvp_precision='fp32'"):
        MeanFlow(jvp="fd", jvp_precision="autocast")


def test_jvp_settings_are_checked_and_kept_out_of_old_identities():
    for bad, match in [(dict(jvp="forward"), "jvp must be one of 'func', 'fd'"),
                       (dict(fd_step=0.0), "fd_step must be a number in \\(0, 1\\)"),
                       (dict(fd_step=2), "fd_step must be a number in \\(0, 1\\)"),
                       (dict(jvp_precision="bf16"), "jvp_precision must be one of \\('fp32', 'autocast'\\)"),
                       (dict(jvp="fd", jvp_precision="autocast"), "jvp='fd' needs jvp_precision='fp32'")]:
        with pytest.raises(EngineError, match=match):
            SCT(**bad)
    with pytest.raises(EngineError, match="jvp must be one of 'auto', 'dual', 'func', 'fd'"):
        MeanFlow(jvp="forward")
    # at the values every earlier run had, the new settings are not part of the identity (runs still resume) …
    for obj in (SCT(), MeanFlow()):
        d = describe_object(obj)
        assert not {"jvp_precision", "fd_step"} & set(d) and ("jvp_mode" not in d) == isinstance(obj, SCT)
    # … and away from them they are
    d = describe_object(SCT(jvp="fd", fd_step=0.01))
    assert (d["jvp_mode"], d["fd_step"]) == ("fd", 0.01) and "jvp_precision" not in d
    assert describe_object(MeanFlow(jvp_precision="autocast"))["jvp_precision"] == "autocast"
    assert describe_object(MeanFlow(jvp="fd"))["fd_step"] == FD_STEP
    assert math.isclose(FD_STEP, 5e-3)


def test_a_finite_difference_step_counts_its_two_forwards():
    """The loop's counters (engine/training/run_state.py): the tangent by central differences costs two student forwards
    where the JVP counts one — sCT 3 per sample instead of 2; Mean Flow 2 per r ≠ t row instead of 1 — and the
    losses agree with the exact path's to the difference's error."""
    from engine.objectives import StepRNG
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64) * 0.5
    net = unet().double()
    exact, fd = (SCT(jvp=m)(net, x, None, StepRNG.for_step(0, 0, 0)) for m in ("func", "fd"))
    assert (exact.student_forward, fd.student_forward) == (16, 24)
    assert rel(fd.loss.detach(), exact.loss.detach()) < 1e-4
    d, y = dit().double(), torch.randint(0, 4, (8,))
    exact, fd = (MeanFlow(jvp=m, label_dropout=0.0)(d, x, y, StepRNG.for_step(0, 0, 0)) for m in ("dual", "fd"))
    assert (exact.student_forward, fd.student_forward) == (8 + 2, 8 + 4)     # 2 of 8 rows have r ≠ t
    assert rel(fd.loss.detach(), exact.loss.detach()) < 1e-4
