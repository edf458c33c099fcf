"""An analytic data distribution whose exact EDM denoiser is closed form: the project's exact teacher.

p(y) = Σ_k w_k N(y; μ_k, diag(s_k²)) over an arbitrary event shape (vectors [D] or images [C, H, W]).
Noising with σ keeps it a mixture: p_σ(x) = Σ_k w_k N(x; μ_k, diag(s_k² + σ²)), so

    E[y | x] = Σ_k γ_k(x) (μ_k + s_k²/(s_k² + σ²) (x − μ_k)),   γ_k ∝ w_k N(x; μ_k, diag(s_k² + σ²)).

All arithmetic is float64; outputs are cast back to the input dtype so the mixture can stand in for a float32
network teacher as well as serve as a float64 oracle. Components may carry class labels; a conditional call
restricts the posterior to the components of the requested class (a class-conditional teacher).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class GaussianMixture:
    """Diagonal-covariance Gaussian mixture with exact noisy score, denoiser and velocity.

    means: [K, *event_shape]; stds: scalar, [K] or [K, *event_shape]; weights: [K] (normalised here);
    classes: optional [K] integer class of each component (for conditional use)."""

    def __init__(self, means, stds=0.1, weights=None, classes: Sequence[int] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim < 2:
            raise ValueError(f"means must be [K, *event_shape], got shape {tuple(self.means.shape)}")
        K = self.means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0 or stds.shape == (K,):
            stds = stds.reshape(-1, *([1] * (self.means.ndim - 1))).expand_as(self.means)
        if stds.shape != self.means.shape:
            raise ValueError(f"stds must be a scalar, [K] or {tuple(self.means.shape)}, got {tuple(stds.shape)}")
        if (stds <= 0).any():
            raise ValueError("component standard deviations must be positive")
        self.vars = stds.clone() ** 2
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        self.log_weights = torch.log(w / w.sum())
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if self.classes is not None and self.classes.shape != (K,):
            raise ValueError(f"classes must have one entry per component ({K})")

    # ---- construction helpers ----
    @classmethod
    def random(cls, num_components: int, event_shape: Sequence[int], std: float = 0.1, scale: float = 0.7,
               seed: int = 0, num_classes: int = 0) -> "GaussianMixture":
        """Components with means uniform in [−scale, scale] (inside the [−1, 1] data range), equal weights,
        random per-component std in [std/2, std]; classes assigned round-robin when num_classes > 0."""
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand((num_components, *event_shape), generator=g, dtype=torch.float64) * 2 - 1) * scale
        stds = std * (0.5 + 0.5 * torch.rand(num_components, generator=g, dtype=torch.float64))
        classes = [k % num_classes for k in range(num_components)] if num_classes else None
        return cls(means, stds, classes=classes)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else int(self.classes.max()) + 1

    # ---- sampling ----
    def sample(self, n: int, generator: torch.Generator | None = None, labels=None,
               return_labels: bool = False):
        """n exact samples in float64 ([n, *event_shape]); with labels, components are drawn within each class."""
        logits = self.log_weights.expand(n, -1).clone()
        logits = logits + self._class_mask(labels, n)
        comp = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        eps = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        y = self.means[comp] + self.vars[comp].sqrt() * eps
        if return_labels:
            return y, (self.classes[comp] if self.classes is not None else comp)
        return y

    # ---- exact noisy quantities ----
    def _class_mask(self, labels, batch: int) -> torch.Tensor:
        if labels is None:
            return torch.zeros(batch, 1, dtype=torch.float64)
        if self.classes is None:
            raise ValueError("this mixture has no component classes; pass labels=None")
        labels = torch.as_tensor(labels).cpu()
        if labels.ndim == 2:  # one-hot
            labels = labels.argmax(dim=1)
        mask = self.classes[None, :] == labels.long()[:, None]
        if not mask.any(dim=1).all():
            raise ValueError("a label names a class with no mixture component")
        return torch.where(mask, 0.0, -math.inf).to(torch.float64)

    def _component_logp(self, x64: torch.Tensor, var_t: torch.Tensor, labels) -> torch.Tensor:
        """log w_k + log N(x; μ_k, diag(s_k² + σ²)) [B, K], −inf for components outside the requested class."""
        B, K = x64.shape[0], self.means.shape[0]
        diff = x64[:, None] - self.means[None]  # [B, K, *event]
        red = tuple(range(2, diff.ndim))
        logp = -0.5 * ((diff ** 2) / var_t + torch.log(2 * math.pi * var_t)).sum(dim=red)
        return logp + self.log_weights[None] + self._class_mask(labels, B).expand(B, K)

    def _sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1)
        if s.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma has {s.numel()} entries for a batch of {x.shape[0]}")
        return s.expand(x.shape[0]).reshape(-1, 1, *([1] * len(self.event_shape)))  # [B, 1, 1...]

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected x of shape [B, {', '.join(map(str, self.event_shape))}], got {tuple(x.shape)}")

    def denoise(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """Exact E[y | y + σε = x], computed in float64, returned in x's dtype and device."""
        self._check(x)
        x64 = x.detach().to(device="cpu", dtype=torch.float64)
        s = self._sigma(sigma, x64)
        var_t = self.vars[None] + s ** 2                         # [B, K, *event]
        gamma = torch.softmax(self._component_logp(x64, var_t, labels), dim=1)  # [B, K]
        comp_mean = self.means[None] + self.vars[None] / var_t * (x64[:, None] - self.means[None])
        g = gamma.reshape(*gamma.shape, *([1] * len(self.event_shape)))
        return (g * comp_mean).sum(dim=1).to(device=x.device, dtype=x.dtype)

    __call__ = denoise  # the engine's denoiser signature: denoiser(x, sigma, labels=None)

    def score(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """∇_x log p_σ(x) = (D(x; σ) − x) / σ²  (Tweedie)."""
        s = self._sigma(sigma, x).squeeze(1).to(device=x.device, dtype=x.dtype)
        return (self.denoise(x, sigma, labels) - x) / s ** 2

    def log_prob(self, x: torch.Tensor, sigma=0.0, labels=None) -> torch.Tensor:
        """log p_σ(x) in float64, [B]."""
        self._check(x)
        x64 = x.to(device="cpu", dtype=torch.float64)  # differentiable: tests take Tweedie's score from it
        s = self._sigma(sigma, x64)
        var_t = self.vars[None] + s ** 2
        return torch.logsumexp(self._component_logp(x64, var_t, labels), dim=1)

    def velocity(self, z_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """Exact flow-matching velocity E[ε − y | z_t] for z_t = (1 − t)y + tε (docs/spec/mf.md §0, §6.4)."""
        from engine.schedules import velocity_from_edm_denoiser
        return velocity_from_edm_denoiser(self.denoise, z_t, t, labels)
