"""Continuous-time consistency models with TrigFlow: sCT and sCD (Lu & Song 2025; docs/spec/mf.md §5) — the
baselines of the throughput comparison.

TrigFlow: x_t = cos t·x_0 + sin t·z, z ~ N(0, σ_d² I), t ∈ [0, π/2], and the consistency function
f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t). The engine's networks are EDM-preconditioned denoisers
D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise); with σ = σ_d·tan t and x = x_t / cos t one has c_skip·x = cos t·x_t,
c_out = σ_d·sin t and c_in·x = x_t/σ_d, so D = f_θ exactly with F_θ = −F (`_Precond.backbone_output`). The
same networks (and checkpoints) therefore serve ECT, CMT and sCM; only the time conditioning differs from the
paper's c_noise(t) = t (ours stays EDM's ln(σ)/4).

One training step (docs/spec/mf.md §5.2):

    τ ~ N(P_mean, P_std²), t = arctan(e^τ / σ_d);  x_t = cos t·x_0 + sin t·z
    dx_t/dt = cos t·z − sin t·x_0                               (sCT)
            = (cos t·x_t − D_teacher(x_t / cos t, σ_d tan t)) / sin t    (sCD; docs/spec/mf.md §5.4)
    (F⁻, cos t sin t·dF⁻/dt) = JVP of F_θ⁻ at (x_t, t) with tangents (cos t sin t·dx_t/dt, cos t sin t), no grad
    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r_w·(cos t sin t·x_t + σ_d·cos t sin t·dF⁻/dt),  r_w = min(1, images/warm-up)
    g ← g / (‖g‖ + c)                                            per sample, c = 0.1
    L = (e^{w_φ(t)} / D)·‖F_θ − F⁻ − g‖² − w_φ(t)               per sample, D = elements per sample

F⁻ is the current network without gradient (no EMA teacher), with the same dropout masks as the gradient pass
(both run inside one `dropout_generator` seed). The JVP is `torch.func.jvp` through the whole denoiser: the
networks' attention is explicit (einsum + softmax), which forward-mode AD supports. w_φ is a learned scalar
per time — EDM2's uncertainty head (Fourier features of c_noise, a linear layer) — owned by the objective and
optimised with the network (`Objective.parameters`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine import dist
from engine.networks.dropout import dropout_generator
from engine.objectives.base import LossOutput, Objective, StepRNG
from engine.objectives.cmt import freeze
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
    """TrigFlow's F_θ(x_t/σ_d, t) from an EDM-preconditioned denoiser (see the module docstring)."""
    tb = batch_view(t, x_t)
    return -net.backbone_output(x_t / torch.cos(tb), sigma_data * torch.tan(t), labels)


class _SCM(Objective):
    def __init__(self, P_mean: float, P_std: float, sigma_data: float, warmup_kimg: float | None, c: float,
                 prior_weight: bool, weight_channels: int):
        if warmup_kimg is not None and warmup_kimg <= 0:
            raise ValueError(f"warmup_kimg must be positive or None, got {warmup_kimg!r}")
        if c <= 0:
            raise ValueError(f"the tangent normalisation constant c must be positive, got {c!r}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.warmup_kimg, self.c, self.prior_weight = warmup_kimg, float(c), bool(prior_weight)
        self.weight = AdaptiveWeight(weight_channels, sigma_data)
        self.r_w = 1.0 if warmup_kimg is None else 0.0

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

    def tangent(self, net, x_t, t, dxdt, labels, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(F⁻, g) before normalisation: one no-grad JVP of F_θ⁻ (docs/spec/mf.md §5.2)."""
        cs = batch_view(torch.cos(t) * torch.sin(t), x_t)
        with torch.no_grad(), dropout_generator(seed, x_t.device):
            F_minus, dF = torch.func.jvp(lambda x, tt: trig_F(net, x, tt, labels, self.sigma_data),
                                         (x_t, t), (cs * dxdt, cs.reshape(-1)))
        cos2 = batch_view(torch.cos(t) ** 2, x_t)
        g = -cos2 * (self.sigma_data * F_minus - dxdt) - self.r_w * (cs * x_t + self.sigma_data * dF)
        return F_minus, g

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        if dist.is_distributed():
            # the tangent and the prediction go through `backbone_output`, not the module's forward, which neither
            # a DDP wrapper (gradient sync) nor FSDP (parameter gathering) intercepts
            raise NotImplementedError("sCT/sCD run in a single process for now; under torchrun use CMT, ECT, ECD "
                                      "or Mean Flow")
        dtype = noise_dtype(images)
        x0 = images.to(dtype)
        B, device = x0.shape[0], x0.device
        t = self.sample_t(B, device, dtype, rng)
        z = rng.randn(x0.shape, device, dtype) * self.sigma_data
        seed = rng.seed()
        tb = batch_view(t, x0)
        x_t = torch.cos(tb) * x0 + torch.sin(tb) * z
        dxdt, teacher_nfe = self.velocity(x_t, t, x0, z, labels)
        F_minus, g = self.tangent(net, x_t, t, dxdt, labels, seed)
        norm = g.reshape(B, -1).norm(dim=1)
        g = g / batch_view(norm + self.c, g)
        with dropout_generator(seed, device):
            F_theta = trig_F(net, x_t, t, labels, self.sigma_data).to(dtype)
        D = x0[0].numel()
        sq = (F_theta - F_minus - g).reshape(B, -1).square().sum(dim=1) / D
        if self.prior_weight:  # optional 1/(σ_d tan t) on the first term (NVlabs/FastGen `prior_weighting`)
            sq = sq / (self.sigma_data * torch.tan(t))
        w = self.weight(t).to(sq.dtype)
        loss = torch.exp(w) * sq - w
        return LossOutput(loss=loss, pairs=B, teacher_nfe=teacher_nfe, student_forward=2 * B, student_backward=B)


class SCT(_SCM):
    """Continuous-time consistency training (sCT): dx_t/dt = cos t·z − sin t·x_0, no teacher. Defaults are the
    paper's CIFAR-10 values (P_mean −1.0, P_std 1.4, c = 0.1); `warmup_kimg` is the tangent warm-up (the paper's
    10,000 iterations × the batch), None for none."""

    name = "sct"

    def __init__(self, P_mean: float = -1.0, P_std: float = 1.4, sigma_data: float = SIGMA_DATA,
                 warmup_kimg: float | None = None, c: float = 0.1, prior_weight: bool = False,
                 weight_channels: int = 128):
        super().__init__(P_mean, P_std, sigma_data, warmup_kimg, c, prior_weight, weight_channels)

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
                 prior_weight: bool = False, weight_channels: int = 128):
        super().__init__(P_mean, P_std, sigma_data, warmup_kimg, c, prior_weight, weight_channels)
        self.teacher = freeze(teacher)
        self.guidance = None if guidance is None else float(guidance)

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, labels) -> torch.Tensor:
        tb = batch_view(t, x_t)
        D = self.teacher(x_t / torch.cos(tb), self.sigma_data * torch.tan(t), labels).to(x_t.dtype)
        return (torch.cos(tb) * x_t - D) / torch.sin(tb)

    def velocity(self, x_t, t, x0, z, labels):
        d = self.teacher_velocity(x_t, t, labels)
        if self.guidance is None:
            return d, x_t.shape[0]
        d_uncond = self.teacher_velocity(x_t, t, None)
        return d + (self.guidance - 1) * (d - d_uncond), 2 * x_t.shape[0]
