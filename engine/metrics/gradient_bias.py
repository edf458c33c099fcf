"""The gradient bias of consistency training at given parameters (the CMT paper's §5 / App. F.4, measured on the
analytic Gaussian mixture; recipes/gmm_gradient_bias.py).

With the squared distance and unit weight, at parameters θ:

    oracle loss       L_or(θ) = E ‖f_θ(x_t, t) − Ψ_{t→σ_min}(x_t)‖²,           x_t = y + tε
    consistency loss  L_CM(θ) = E ‖f_θ(x_t, t) − sg[f_θ(x_r, r)]‖²,          x_r = y + rε (the same ε, as ECT)

where Ψ is the exact PF-ODE map of the mixture (a float64 RK4 solve of its closed-form denoiser) and r < t the
consistency gap. Both gradients share the f_θ(x_t, t) term, so

    ∇L_or − ∇L_CM = E d(y, ε, t),   d = ∇_θ 2⟨f_θ(x_t, t), sg[f_θ(x_r, r) − Ψ(x_t)]⟩

and the squared gradient bias is B(θ) = ‖E d‖². The plug-in ‖mean of d over a batch‖² overestimates it by
tr Cov(d)/n; here the batch means of K independent batches are paired, (1, 2), (3, 4), …, and the inner products of
the pairs are unbiased estimates of B whose mean and standard error are reported (`unbiased_squared_norm`).

The (y, ε, t) draws and Ψ(x_t) are made once (`BiasProbe`) and shared by every θ and every gap (common random
numbers: differences between initialisations are not masked by sampling noise). t follows ECT's log-normal
(P_mean, P_std), clamped to [σ_min, σ_max] (ECT does not clamp; Ψ is defined only above σ_min). The gap is ECT's
(engine/objectives/ect.py `t_to_r`): r = t·(1 − Δt·(1 + k·sigmoid(−b·t))) with the relative gap scale Δt = 1/q,
r = 0 meaning the target is y itself (f's boundary).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.metrics.flow_map import reference_ode_steps
from engine.schedules import SIGMA_MAX, SIGMA_MIN
from engine.solvers import pf_ode_reference

__all__ = ["BiasProbe", "unbiased_squared_norm"]


def unbiased_squared_norm(means: torch.Tensor) -> tuple[float, float]:
    """‖μ‖² from K ≥ 2 independent estimates of μ ([K, P], K even): the mean and the standard error of the
    inner products ⟨m₁, m₂⟩, ⟨m₃, m₄⟩, … (each unbiased: E⟨m, m'⟩ = ‖μ‖² for independent m, m')."""
    if means.ndim != 2 or means.shape[0] < 2 or means.shape[0] % 2:
        raise ValueError(f"need an even number ≥ 2 of independent estimates [K, P], got {tuple(means.shape)}")
    m = means.to(torch.float64)
    pairs = (m[0::2] * m[1::2]).sum(dim=1)
    se = float(pairs.std() / math.sqrt(pairs.numel())) if pairs.numel() > 1 else float("nan")
    return float(pairs.mean()), se


@dataclass
class _Batch:
    y: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    psi: torch.Tensor          # Ψ_{t→σ_min}(y + tε), float64


class BiasProbe:
    """`batches` independent batches of `batch_size` draws (y from the mixture, ε, t) with the exact Ψ(x_t),
    fixed at construction (from `generator`). `bias(net, gap)` is B(θ) at the network's current parameters."""

    def __init__(self, gm, batches: int = 16, batch_size: int = 512, P_mean: float = -1.1, P_std: float = 2.0,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, generator: torch.Generator | None = None,
                 ode_steps_per_unit: float = 64.0):
        if batches < 2 or batches % 2:
            raise ValueError(f"batches must be even and ≥ 2 (they are paired), got {batches}")
        self.sigma_min = float(sigma_min)
        steps = reference_ode_steps(sigma_max, sigma_min, ode_steps_per_unit)  # enough for the longest interval
        self.batches = []
        for _ in range(batches):
            y = gm.sample(batch_size, generator=generator).to(torch.float64)
            eps = torch.randn(y.shape, generator=generator, dtype=torch.float64)
            t = (torch.randn(batch_size, generator=generator, dtype=torch.float64) * P_std + P_mean).exp()
            t = t.clamp(sigma_min, sigma_max)
            x_t = y + _view(t, y) * eps
            psi = pf_ode_reference(gm.denoise, x_t, t, sigma_min, steps)
            self.batches.append(_Batch(y, eps, t, psi))

    def differences(self, net: nn.Module, gap) -> torch.Tensor:
        """[K, P]: per batch, the mean over its draws of d = ∇_θ 2⟨f(x_t, t), sg[f(x_r, r) − Ψ(x_t)]⟩ (module
        docstring); `gap` maps t to r (e.g. ECT(q=1/Δt).t_to_r). `net` is called in float64, as it is."""
        params = [p for p in net.parameters() if p.requires_grad]
        rows = []
        for b in self.batches:
            r = gap(b.t).to(torch.float64)
            if not (r < b.t).all() or (r < 0).any():
                raise ValueError("the gap must map every t to some r in [0, t)")
            x_t = b.y + _view(b.t, b.y) * b.eps
            x_r = b.y + _view(r, b.y) * b.eps
            with torch.no_grad():
                # r = 0: the target is y itself (ECT's rule); those rows are evaluated at t and replaced
                f_r = net(x_r, torch.where(r > 0, r, b.t))
                f_r = torch.where(_view(r > 0, f_r), f_r, b.y)
            residual = (f_r - b.psi).detach()
            surrogate = 2 * (net(x_t, b.t) * residual).reshape(len(b.t), -1).sum(dim=1).mean()
            grads = torch.autograd.grad(surrogate, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)

    def oracle_gradients(self, net: nn.Module) -> torch.Tensor:
        """[K, P]: per batch, the gradient of the oracle loss (1/n) Σ ‖f(x_t, t) − Ψ(x_t)‖²: the differences'
        limit as the gap closes (∇L_CM → 0), and ∇L_or's own size."""
        params = [p for p in net.parameters() if p.requires_grad]
        rows = []
        for b in self.batches:
            x_t = b.y + _view(b.t, b.y) * b.eps
            loss = (net(x_t, b.t) - b.psi).square().reshape(len(b.t), -1).sum(dim=1).mean()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    def bias(self, net: nn.Module, gap) -> tuple[float, float]:
        """B(θ) = ‖∇L_or − ∇L_CM‖² (unbiased) and its standard error over the batch pairs."""
        return unbiased_squared_norm(self.differences(net, gap))

    def oracle_gradient_norm(self, net: nn.Module) -> tuple[float, float]:
        """‖∇L_or(θ)‖² (unbiased) and its standard error."""
        return unbiased_squared_norm(self.oracle_gradients(net))


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
