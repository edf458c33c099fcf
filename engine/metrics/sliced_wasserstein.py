"""Sliced 2-Wasserstein distance between two sample sets (1- and 2-step samples against data).

    SW₂(p, q)² = E_{θ ~ U(S^{D−1})} W₂²(θ·p, θ·q),   W₂²(a, b) = ∫₀¹ (F_a⁻¹(u) − F_b⁻¹(u))² du   in 1-D.

Each 1-D term is computed exactly for the two empirical distributions: their quantile functions are step
functions with breakpoints at i/N and j/M, so on the common grid formed by the union of those breakpoints both
are constant and the integral is a finite sum (equal sizes reduce to the mean squared difference of the sorted
projections). The only Monte-Carlo error is over θ; in 1-D there is a single direction and no such error.

Note the scale: for p and q differing by a translation v, SW₂² = E(θ·v)² = ‖v‖²/D, not ‖v‖² (W₂²).
"""
from __future__ import annotations

import math

import torch

__all__ = ["sliced_wasserstein", "wasserstein_1d_squared"]


def _as_matrix(a, name: str) -> torch.Tensor:
    a = torch.as_tensor(a).detach().to(device="cpu", dtype=torch.float64)
    if a.ndim == 1:
        a = a[:, None]          # [N] is N scalars
    a = a.reshape(a.shape[0], -1)
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} has non-finite entries")
    return a


def wasserstein_1d_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W₂² between the empirical distributions of the columns of a [N, P] and b [M, P] (float64), per
    column: ∫₀¹ (F_a⁻¹ − F_b⁻¹)² over the union of the quantile breakpoints {i/N} ∪ {j/M}. Returns [P]."""
    a, _ = torch.sort(a.to(torch.float64), dim=0)
    b, _ = torch.sort(b.to(torch.float64), dim=0)
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).square().mean(dim=0)
    # i/n and j/m are correctly rounded, so equal fractions give equal floats and unique() merges them.
    levels = torch.unique(torch.cat([torch.arange(n + 1, dtype=torch.float64) / n,
                                     torch.arange(m + 1, dtype=torch.float64) / m]))
    mid = 0.5 * (levels[1:] + levels[:-1])
    weight = levels[1:] - levels[:-1]                                # [L], sums to 1
    ia = torch.clamp((mid * n).long(), max=n - 1)                    # F_a⁻¹(u) = a_(⌊uN⌋) on (i/N, (i+1)/N)
    ib = torch.clamp((mid * m).long(), max=m - 1)
    return (weight[:, None] * (a[ia] - b[ib]).square()).sum(dim=0)


def sliced_wasserstein(x, y, num_projections: int = 512, generator: torch.Generator | None = None,
                       squared: bool = False, chunk: int = 128) -> float:
    """Sliced 2-Wasserstein distance between samples x [N, ...] and y [M, ...] (sizes may differ), float64.

    Directions are uniform on the sphere, drawn from `generator` (default: a fixed seed, so repeated
    evaluations of different models use the same directions). 1-D inputs ([N] or [N, 1]) use the one direction
    and are exact. Returns SW₂, or SW₂² with squared=True. Symmetric in x and y."""
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same event size, got {x.shape[1]} and {y.shape[1]}")
    dim = x.shape[1]
    if dim == 1:
        sw2 = float(wasserstein_1d_squared(x, y)[0])
    else:
        if num_projections < 1:
            raise ValueError(f"num_projections must be ≥ 1, got {num_projections}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        theta = torch.randn(dim, num_projections, generator=generator, dtype=torch.float64)
        theta = theta / theta.norm(dim=0, keepdim=True)
        total = 0.0
        for k in range(0, num_projections, chunk):
            t = theta[:, k:k + chunk]
            total += float(wasserstein_1d_squared(x @ t, y @ t).sum())
        sw2 = total / num_projections
    return sw2 if squared else math.sqrt(sw2)
