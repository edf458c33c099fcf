"""Noise schedules and conversions between the three time variables the engine meets.

* EDM:  x_σ = y + σ ε, σ ∈ [σ_min, σ_max]; PF-ODE dx/dσ = (x − D(x; σ)) / σ   (docs/spec/cm.md §1.1).
* log-SNR: λ = −ln σ (half log-SNR with α = 1); the teacher solver steps uniformly in λ (docs/spec/cm.md §2.2).
* Flow matching (Mean Flow convention): z_t = (1 − t) y + t ε, t ∈ [0, 1], t = 1 is pure noise
  (docs/spec/mf.md §0, §6.4). σ = t / (1 − t), x_EDM = z_t / (1 − t).

Grids are returned as float64 tensors unless a dtype is given: the solvers convert them to the state dtype
themselves, and the float64 grid is what the float64 reference path needs.
"""
from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def _check_range(nfe: int, sigma_max: float, sigma_min: float) -> None:
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"number of steps must be a positive integer, got {nfe!r}")
    if not (sigma_max > sigma_min > 0):
        raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")


def karras_sigmas(num_steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, rho: float = RHO,
                  append_zero: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM's ρ-grid: σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1, then σ_N = 0
    (docs/spec/cm.md §1.1). `num_steps` = N grid points before the appended zero (EDM's `num_steps`)."""
    _check_range(num_steps, sigma_max, sigma_min)
    if num_steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        sig = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if append_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return sig.to(dtype)


def logsnr_sigmas(nfe: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The teacher's grid: `nfe + 1` descending σ uniform in λ = −ln σ (docs/spec/cm.md §2.2).

    σ_i = σ_max^{1 − i/N} σ_min^{i/N}; with N = 16 the λ-step is ln(80/0.002)/16 = 0.66228967 and σ_7 = 0.77569
    (the mid-training two-step evaluation point). The reference builds the float32 grid as
    exp(−(u·(λ_0 − λ_T) + λ_T)) with float32 λ; pass dtype=torch.float32 to get that rounding instead of the
    exactly-rounded float64 values."""
    _check_range(nfe, sigma_max, sigma_min)
    if dtype == torch.float64:
        u = torch.linspace(0, 1, nfe + 1, dtype=torch.float64)
        lam_T, lam_0 = -math.log(sigma_max), -math.log(sigma_min)
        sig = torch.exp(-(u * (lam_0 - lam_T) + lam_T))
        sig[0], sig[-1] = sigma_max, sigma_min  # exact endpoints, not exp(log(.)) round trips
        return sig
    # Reference float32 arithmetic (the CMT copy's affine form on float32 tensors, docs/spec/cm.md §2.2 ★1).
    t_T = torch.tensor(sigma_max, dtype=dtype)
    t_0 = torch.tensor(sigma_min, dtype=dtype)
    lam_T, lam_0 = -torch.log(t_T), -torch.log(t_0)
    u = torch.linspace(0, 1, nfe + 1, dtype=dtype)
    return torch.exp(-(u * (lam_0 - lam_T) + lam_T))


def sigma_to_lambda(sigma):
    """Half log-SNR of the EDM (VE, α = 1) path: λ = −ln σ."""
    return -torch.log(torch.as_tensor(sigma)) if not isinstance(sigma, (int, float)) else -math.log(sigma)


def lambda_to_sigma(lam):
    return torch.exp(-torch.as_tensor(lam)) if not isinstance(lam, (int, float)) else math.exp(-lam)


# ---- flow-matching time (docs/spec/mf.md §0, §6.4) ----------------------------------------------------------

def t_to_sigma(t):
    """FM time t ∈ [0, 1) → EDM σ = t / (1 − t); t = 1 (pure noise) maps to σ = ∞."""
    return t / (1 - t)


def sigma_to_t(sigma):
    """EDM σ → FM time t = σ / (1 + σ)."""
    return sigma / (1 + sigma)


def fm_to_edm(z_t, t):
    """Rescale a flow-matching state to the EDM state at σ = t/(1 − t): x_EDM = z_t / (1 − t)."""
    return z_t / (1 - t)


def edm_to_fm(x, sigma):
    """Inverse of `fm_to_edm`: z_t = x_EDM / (1 + σ)  (since 1 − t = 1 / (1 + σ))."""
    return x / (1 + sigma)


def velocity_to_denoised(z_t, t, v):
    """Linear FM path (α = 1 − t, σ_t = t, v = ε − y): ŷ = z_t − t·v̂  (docs/spec/mf.md §6.2)."""
    return z_t - t * v


def denoised_to_velocity(z_t, t, y_hat):
    """Linear FM path: v̂ = (z_t − ŷ) / t  (docs/spec/mf.md §6.2); undefined at t = 0."""
    return (z_t - y_hat) / t


def velocity_from_edm_denoiser(denoiser, z_t, t, labels=None):
    """The FM velocity field implied by an EDM denoiser D (docs/spec/mf.md §6.4: D(x_EDM, σ) = z_t − t·v).

    `t` may be a float or a [B] tensor; the call goes through the EDM state x = z_t/(1 − t) at σ = t/(1 − t)."""
    t_b = torch.as_tensor(t, dtype=z_t.dtype, device=z_t.device)
    t_b = t_b.reshape(-1, *([1] * (z_t.ndim - 1)))
    sigma = t_to_sigma(t_b)
    y_hat = denoiser(fm_to_edm(z_t, t_b), sigma.reshape(-1), labels)
    return denoised_to_velocity(z_t, t_b, y_hat)


def edm_denoiser_from_velocity(velocity, x, sigma, labels=None):
    """The EDM denoiser implied by an FM velocity field v(z, t): D(x, σ) = z_t − t·v(z_t, t) with
    t = σ/(1 + σ), z_t = x/(1 + σ)  (docs/spec/mf.md §6.4)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    t = sigma_to_t(s)
    z = edm_to_fm(x, s)
    return velocity_to_denoised(z, t, velocity(z, t.reshape(-1), labels))
