"""Fréchet distance between Gaussian summaries of feature sets (FID, FD_DINOv2, the digits-classifier FD).

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½          (docs/spec/cm.md §7.1, docs/spec/edm2_latent.md
    §5.1)

The reference code takes tr sqrtm(Σ₁Σ₂) with `scipy.linalg.sqrtm` of the non-symmetric product and keeps the
real part. The product has the same eigenvalues as the symmetric PSD matrix M = Σ₁^½ Σ₂ Σ₁^½, and M's nonzero
eigenvalues are those of Qᵀ Σ₁ Q for Σ₂ = Q Qᵀ (Q from a pivoted Cholesky factorisation, [D, rank Σ₂]); we take the
trace from them (those at rounding level set to 0), factoring whichever covariance has the lower rank: the same
number on well-conditioned covariances, and no complex parts, no failed Schur iterations and no NaN when a
covariance is rank-deficient (fewer samples than feature dimensions, dead ReLU units). Everything is float64.

Statistics follow EDM's `fid.py` by default: μ = mean, Σ unbiased (divides by N − 1); `unbiased=False` gives
the biased Σ of the CMT/ECT metric code (divides by N; docs/spec/cm.md §7 item 14). `FeatureStatistics` accumulates
the same statistics over batches in float64 for feature extractors that stream (Inception, DINOv2).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "feature_statistics", "FeatureStatistics"]


def _float64(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite entries")
    return a


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix from `eigh`, with those at rounding level set to 0. eigh resolves
    eigenvalues only to about D·ε·λ_max; the null space of a rank-deficient covariance comes back as ±that
    much noise, whose square roots (~√(D·ε·λ_max) each) would otherwise add up to a visible error."""
    tol = max(float(w.max(initial=0.0)), 0.0) * w.shape[0] * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """Q [D, r] with Σ = Q Qᵀ, r = Σ's numerical rank: LAPACK's pivoted Cholesky (dpstrf), which stops at r at
    tolerance D·ε·max diag Σ, so that it costs O(D r²) for a covariance of few samples and O(D³/3) at full rank."""
    from scipy.linalg.lapack import dpstrf
    c, piv, rank, info = dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected argument {-info}")
    q = np.empty((sigma.shape[0], rank))
    q[piv - 1] = np.tril(c[:, :rank])          # Σ[piv][:, piv] = L Lᵀ  ⇒  Σ = Q Qᵀ with Q[piv] = L
    return q


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) in float64 (NumPy arrays or tensors).

    μ: [D]; Σ: [D, D], symmetric positive semi-definite (symmetrised here; rank-deficient is fine)."""
    mu1, mu2 = _float64(mu1, "mu1"), _float64(mu2, "mu2")
    sigma1, sigma2 = _float64(sigma1, "sigma1"), _float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match the means, got {s.shape}")
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    # Σ₁^½ Σ₂ Σ₁^½ has the nonzero eigenvalues of Qᵀ Σ₂ Q for Σ₁ = Q Qᵀ (and of Qᵀ Σ₁ Q for Σ₂ = Q Qᵀ), an r × r
    # matrix for a factor of rank r: with a covariance of fewer samples than dimensions (8–1,000 samples of
    # 2,048 Inception features) no D × D eigendecomposition is needed
    # (the callers pass the samples' statistics first, the reference's second)
    q, other = _psd_factor(sigma1), sigma2
    if q.shape[1] == d:
        q2 = _psd_factor(sigma2)
        if q2.shape[1] < d:
            q, other = q2, sigma1
    m = q.T @ other @ q
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh(0.5 * (m + m.T)))).sum() if m.size else 0.0
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # Rounding can leave identical statistics a hair below 0; a distance is never negative.
    return float(max(fd, 0.0))


def feature_statistics(features, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D, D]) of features [N, D] (array or tensor), float64. Σ divides by N − 1 (EDM `fid.py`)
    or, with unbiased=False, by N (CMT/ECT metric code)."""
    f = _float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    stats = FeatureStatistics(f.shape[1])
    stats.update(f)
    return stats.mu_sigma(unbiased)


class FeatureStatistics:
    """Running μ and Σ of [N, D] feature batches, accumulated in float64.

    Sums are taken about a shift (the first batch's mean) so that Σf fᵀ − N μμᵀ does not cancel
    catastrophically when the mean is large against the spread. The result does not depend on how the features
    are split into batches, up to float64 rounding."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.num = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(self.dim, dtype=np.float64)
        self._sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features) -> None:
        f = _float64(features, "features")
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got shape {f.shape}")
        if f.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = f.mean(axis=0)
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._sum_outer += c.T @ c
        self.num += f.shape[0]

    def mu_sigma(self, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
        n = self.num
        if n < (2 if unbiased else 1):
            raise ValueError(f"need at least {2 if unbiased else 1} feature vectors, have {n}")
        mean_c = self._sum / n
        sigma = (self._sum_outer - n * np.outer(mean_c, mean_c)) / (n - 1 if unbiased else n)
        return self._shift + mean_c, 0.5 * (sigma + sigma.T)
