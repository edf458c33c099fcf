"""Continuous-time consistency models with TrigFlow: sCT and sCD (Lu & Song 2025; docs/spec/mf.md §5) — the
baselines of the throughput comparison.

TrigFlow: x_t = cos t·x_0 + sin t·z, z ~ N(0, σ_d² I), t ∈ [0, π/2], and the consistency function
f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t). The engine's networks are EDM-preconditioned denoisers
D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise); with σ = σ_d·tan t and x = x_t / cos t one has c_skip·x = cos t·x_t,
c_out = σ_d·sin t and c_in·x = x_t/σ_d, so D = f_θ exactly with F_θ = −F (`_Precond.forward(..., raw=True)`). The
same networks (and checkpoints) therefore serve ECT, CMT and sCM; only the time conditioning differs from the
paper's c_noise(t) = t (ours stays EDM's ln(σ)/4).

One training step (docs/spec/mf.md §5.2):

    τ ~ N(P_mean, P_std²), t = arctan(e^τ / σ_d);  x_t = cos t·x_0 + sin t·z
    dx_t/dt = cos t·z − sin t·x_0                               (sCT)
            = (cos t·x_t − D_teacher(x_t / cos t, σ_d tan t)) / sin t    (sCD; docs/spec/mf.md §5.4)
    F⁻ = sg(F_θ(x_t, t));  cos t sin t·dF⁻/dt = JVP of F_θ⁻ at (x_t, t) along (cos t sin t·dx_t/dt, cos t sin t)
    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r_w·(cos t sin t·x_t + σ_d·cos t sin t·dF⁻/dt),  r_w = min(1, images/warm-up)
    g ← g / (‖g‖ + c)                                            per sample, c = 0.1
    L = (e^{w_φ(t)} / D)·‖F_θ − F⁻ − g‖² − w_φ(t)               per sample, D = elements per sample

F⁻ is the current network without gradient (no EMA teacher): the prediction F_θ itself, detached, so F_θ − F⁻ is
exactly 0 in value whatever precision the passes run in (as NVlabs/FastGen; a primal from an fp32 JVP pass against
a bf16 prediction would add their rounding difference to the target). dF⁻/dt comes from one no-grad pass along
the tangent with the same dropout masks as the gradient pass (both inside one `dropout_generator` seed), in
`jvp_precision` (engine/jvp.py): `jvp='func'` is torch.func.jvp through the whole denoiser (the networks'
attention is explicit einsum + softmax, which forward-mode AD supports), `jvp='fd'` the central difference along
(cos t sin t·dx_t/dt, cos t sin t) with step `fd_step` (t moves by fd_step·cos t sin t, which stays inside
(0, π/2) for any step below 1). w_φ is a learned scalar per time — EDM2's uncertainty head (Fourier features of
c_noise, a linear layer) — owned by the objective and optimised with the network (`Objective.parameters`).

Data parallelism (engine/dist.py): the prediction is an ordinary forward through the wrapper (the denoiser's
`forward(..., raw=True)`), so DDP or FSDP2 reduces the network's gradients once; the tangent pass runs without
gradients on `dist.jvp_view(net)`; w_φ's gradients are averaged over the ranks by the loop (engine/training/loop.py
train_step). t and z are drawn for the global batch (StepRNG), so a run does not depend on the world size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine import dist
from engine import jvp as jvp_ops
from engine.checks import one_of
from engine.jvp import FD_STEP
from engine.networks.dropout import dropout_generator
from engine.objectives.base import LossOutput, Objective, StepRNG, phase
from engine.objectives.cmt import freeze_denoiser
from engine.objectives.edm import batch_view, noise_dtype
from engine.schedules import SIGMA_DATA


class AdaptiveWeight(nn.Module):
    """w_φ(t): a linear map of fixed random Fourier features of c_noise = ln(σ_d tan t)/4 (EDM2's logvar head).
    Starts at w = 0 (the linear layer is zero-initialised)."""

    def __init__(self, channels: int = 128, sigma_data: float = SIGMA_DATA, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.sigma_data = float(sigma_data)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c_noise = torch.log(self.sigma_data * torch.tan(t.float())) / 4
        feats = torch.cos(c_noise[:, None] * self.freqs[None] + self.phases[None]) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


def trig_F(net, x_t: torch.Tensor, t: torch.Tensor, labels, sigma_data: float) -> torch.Tensor:
    """TrigFlow's F_θ(x_t/σ_d, t) from an EDM-preconditioned denoiser (see the module docstring), through its
    forward (so through a data-parallel wrapper)."""
    tb = batch_view(t, x_t)
    return -net(x_t / torch.cos(tb), sigma_data * torch.tan(t), labels, raw=True)


JVP_MODES = ("func", "fd")


class _SCM(Objective):
    def __init__(self, P_mean: float, P_std: float, sigma_data: float, warmup_kimg: float | None, c: float,
                 prior_weight: bool, weight_channels: int, jvp_mode: str, fd_step: float, jvp_precision: str):
        if warmup_kimg is not None and warmup_kimg <= 0:
            raise ValueError(f"warmup_kimg must be positive or None, got {warmup_kimg!r}")
        if c <= 0:
            raise ValueError(f"the tangent normalisation constant c must be positive, got {c!r}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.warmup_kimg, self.c, self.prior_weight = warmup_kimg, float(c), bool(prior_weight)
        self.weight = AdaptiveWeight(weight_channels, sigma_data)
        self.r_w = 1.0 if warmup_kimg is None else 0.0
        self.jvp_mode = one_of("jvp", jvp_mode, JVP_MODES, type(self).__name__)
        self.fd_step = jvp_ops.check_step(fd_step, type(self).__name__)
        self.jvp_precision = jvp_ops.check_precision(jvp_precision, type(self).__name__)
        jvp_ops.check_fd_precision(self.jvp_mode, self.jvp_precision, type(self).__name__)

    def identity_omits(self) -> set:
        """Settings left out of the stage identity (Objective.identity_omits): the JVP settings at the values every
        run had before they existed (torch.func.jvp in float32: those runs were CPU runs, whose loop has no
        autocast), and the step when no finite difference is taken."""
        omit = {k for k, v in dict(jvp_mode="func", jvp_precision="fp32").items() if getattr(self, k) == v}
        return omit | ({"fd_step"} if self.jvp_mode != "fd" else set())

    # ---- what the loop sees -------------------------------------------------------------------------------------
    def set_progress(self, nimg: int) -> None:
        # tangent warm-up r_w = min(1, iteration/H), counted in images (H = 10,000 iterations in the paper)
        self.r_w = 1.0 if self.warmup_kimg is None else min(1.0, nimg / (1000 * self.warmup_kimg))

    def log_values(self) -> dict:
        return dict(tangent_warmup=self.r_w)

    def parameters(self) -> list:
        return list(self.weight.parameters())

    def to(self, device):
        self.weight.to(device)
        return self

    def state_dict(self) -> dict:
        return dict(weight=self.weight.state_dict())

    def load_state_dict(self, state: dict) -> None:
        if "weight" in state:
            self.weight.load_state_dict(state["weight"])

    # ---- the step ---------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, device, dtype, rng: StepRNG) -> torch.Tensor:
        tau = rng.randn([batch], device, dtype) * self.P_std + self.P_mean
        return torch.atan(tau.exp() / self.sigma_data)

    def velocity(self, x_t, t, x0, z, labels) -> tuple[torch.Tensor, int]:
        """dx_t/dt and the teacher evaluations (per sample, summed) spent on it."""
        raise NotImplementedError

    def tangent(self, net, x_t, t, dxdt, F_minus, labels, seed: int) -> torch.Tensor:
        """g before normalisation (docs/spec/mf.md §5.2), from one no-grad pass along the tangent
        (cos t sin t·dx_t/dt, cos t sin t) on the JVP view of the network."""
        return self.tangent_from(x_t, t, dxdt, F_minus, self.tangent_jvp(net, x_t, t, dxdt, labels, seed))

    def tangent_jvp(self, net, x_t, t, dxdt, labels, seed: int) -> torch.Tensor:
        """dF along (cos t sin t·dx_t/dt, cos t sin t): the no-grad pass on the JVP view of the network."""
        if self.jvp_mode == "func":
            dist.check_func_jvp(net)
        view = dist.jvp_view(net)
        cs = torch.cos(t) * torch.sin(t)
        x_in, t_in, dx_in, cs_in = jvp_ops.at_least_fp32(self.jvp_precision, x_t, t, batch_view(cs, x_t) * dxdt, cs)

        def F(x, tt):
            with dropout_generator(seed, x_t.device):    # the gradient pass's masks, at every evaluation
                return trig_F(view, x, tt, labels, self.sigma_data)
        with torch.no_grad(), jvp_ops.precision(self.jvp_precision, x_t.device):
            if self.jvp_mode == "fd":
                dF = jvp_ops.central_difference(F, (x_in, t_in), (dx_in, cs_in), self.fd_step)
            else:
                dF = torch.func.jvp(F, (x_in, t_in), (dx_in, cs_in))[1]
        return dF.to(x_t.dtype)

    def tangent_from(self, x_t, t, dxdt, F_minus, dF) -> torch.Tensor:
        cos2, cs = batch_view(torch.cos(t) ** 2, x_t), batch_view(torch.cos(t) * torch.sin(t), x_t)
        return -cos2 * (self.sigma_data * F_minus - dxdt) - self.r_w * (cs * x_t + self.sigma_data * dF)

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        dtype = noise_dtype(images)
        x0 = images.to(dtype)
        B, device = x0.shape[0], x0.device
        t = self.sample_t(B, device, dtype, rng)
        z = rng.randn(x0.shape, device, dtype) * self.sigma_data
        seed = rng.seed()
        tb = batch_view(t, x0)
        x_t = torch.cos(tb) * x0 + torch.sin(tb) * z
        dxdt, teacher_nfe = self.velocity(x_t, t, x0, z, labels)
        with dropout_generator(seed, device):
            F_theta = trig_F(net, x_t, t, labels, self.sigma_data).to(dtype)
        F_minus = F_theta.detach()
        g = self.tangent(net, x_t, t, dxdt, F_minus, labels, seed)
        norm = g.reshape(B, -1).norm(dim=1)
        g = g / batch_view(norm + self.c, g)
        D = x0[0].numel()
        sq = (F_theta - F_minus - g).reshape(B, -1).square().sum(dim=1) / D
        if self.prior_weight:  # optional 1/(σ_d tan t) on the first term (NVlabs/FastGen `prior_weighting`)
            sq = sq / (self.sigma_data * torch.tan(t))
        w = self.weight(t).to(sq.dtype)
        loss = torch.exp(w) * sq - w
        passes = 2 if self.jvp_mode == "fd" else 1    # the tangent pass: one JVP, or two forwards
        return LossOutput(loss=loss, pairs=B, teacher_nfe=teacher_nfe, student_forward=(1 + passes) * B,
                          student_backward=B)


class SCT(_SCM):
    """Continuous-time consistency training (sCT): dx_t/dt = cos t·z − sin t·x_0, no teacher. Defaults are the
    paper's CIFAR-10 values (P_mean −1.0, P_std 1.4, c = 0.1); `warmup_kimg` is the tangent warm-up (the paper's
    10,000 iterations × the batch), None for none. `jvp` 'func' (torch.func.jvp) or 'fd' (central difference,
    step `fd_step`); `jvp_precision` 'fp32' or 'autocast' (engine/jvp.py)."""

    name = "sct"

    def __init__(self, P_mean: float = -1.0, P_std: float = 1.4, sigma_data: float = SIGMA_DATA,
                 warmup_kimg: float | None = None, c: float = 0.1, prior_weight: bool = False,
                 weight_channels: int = 128, jvp: str = "func", fd_step: float = FD_STEP,
                 jvp_precision: str = "fp32"):
        super().__init__(P_mean, P_std, sigma_data, warmup_kimg, c, prior_weight, weight_channels, jvp, fd_step,
                         jvp_precision)

    def velocity(self, x_t, t, x0, z, labels):
        tb = batch_view(t, x0)
        return torch.cos(tb) * z - torch.sin(tb) * x0, 0


class SCD(_SCM):
    """Continuous-time consistency distillation (sCD): dx_t/dt from a frozen EDM-parameterised teacher,
    (cos t·x_t − D(x_t/cos t, σ_d tan t))/sin t (docs/spec/mf.md §5.4; exact for the true denoiser). With `guidance`
    w, classifier-free guidance d + (w − 1)(d − d_∅), d_∅ the teacher without labels (two teacher calls)."""

    name = "scd"

    def __init__(self, teacher, guidance: float | None = None, P_mean: float = -1.0, P_std: float = 1.4,
                 sigma_data: float = SIGMA_DATA, warmup_kimg: float | None = None, c: float = 0.1,
                 prior_weight: bool = False, weight_channels: int = 128, jvp: str = "func",
                 fd_step: float = FD_STEP, jvp_precision: str = "fp32"):
        super().__init__(P_mean, P_std, sigma_data, warmup_kimg, c, prior_weight, weight_channels, jvp, fd_step,
                         jvp_precision)
        self.teacher = freeze_denoiser(teacher, "sCD")
        self.guidance = None if guidance is None else float(guidance)

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, labels) -> torch.Tensor:
        tb = batch_view(t, x_t)
        with phase("teacher"):
            D = self.teacher(x_t / torch.cos(tb), self.sigma_data * torch.tan(t), labels).to(x_t.dtype)
        return (torch.cos(tb) * x_t - D) / torch.sin(tb)

    def velocity(self, x_t, t, x0, z, labels):
        d = self.teacher_velocity(x_t, t, labels)
        if self.guidance is None:
            return d, x_t.shape[0]
        d_uncond = self.teacher_velocity(x_t, t, None)
        return d + (self.guidance - 1) * (d - d_uncond), 2 * x_t.shape[0]
