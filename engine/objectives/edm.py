"""EDM denoising loss: teacher pre-training (docs/spec/cm.md §1.1; NVlabs/edm `training/loss.py`, `EDMLoss`)."""
from __future__ import annotations

import torch

from engine.checks import finite
from engine.objectives.base import LossOutput, Objective, StepRNG
from engine.schedules import SIGMA_DATA


def noise_dtype(images: torch.Tensor) -> torch.dtype:
    """Noise is drawn in the data's dtype when that is float32/float64 (float64 tests get float64 noise),
    else in float32."""
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


def batch_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, ..., 1] broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class EDMLoss(Objective):
    """ln σ ~ N(P_mean, P_std²); per-sample loss Σ_{non-batch} λ(σ)(D(y + σn; σ) − y)², λ = (σ² + σ_d²)/(σσ_d)².

    EDM's loop sums the per-element loss and divides by the batch size, which is the mean over the batch of these
    per-sample sums, i.e. what our loop computes from the returned [B] vector. Random draws in the reference's
    order: ln σ's normal [B] first, then the noise n (no augmentation pipe)."""

    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = SIGMA_DATA):
        self.P_mean, self.P_std = finite("P_mean", P_mean, "EDMLoss"), finite("P_std", P_std, "EDMLoss", low=0.0,
                                                                               strict=True)
        self.sigma_data = finite("sigma_data", sigma_data, "EDMLoss", low=0.0, strict=True)

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        y = images
        B, dtype = y.shape[0], noise_dtype(y)
        sigma = (rng.randn([B], y.device, dtype) * self.P_std + self.P_mean).exp()
        n = rng.randn(y.shape, y.device, dtype)
        s = batch_view(sigma, y)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        D = net(y + s * n, sigma, labels)
        loss = weight * (D - y).flatten(1).square().sum(dim=1)
        return LossOutput(loss=loss, pairs=B, student_forward=B, student_backward=B)


class EDM2Loss(EDMLoss):
    """EDM2's loss with learned uncertainty (docs/spec/edm2_latent.md §2.1; NVlabs/edm2 `training_loop.EDM2Loss`):

        loss_elem = λ(σ)/exp(u(σ))·(D(y + σn; σ) − y)² + u(σ),   λ = (σ² + σ_d²)/(σσ_d)²

    summed per sample (so u counts C·H·W times); u is the network's uncertainty head, `net(x, σ, labels,
    return_logvar=True)` (EDM2Precond). Defaults are the ImageNet-512 presets' P_mean −0.4, P_std 1.0; ImageNet-64
    uses −0.8, 1.6. Draw order as the reference's: ln σ's normal, then the noise."""

    name = "edm2"

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        y = images
        B, dtype = y.shape[0], noise_dtype(y)
        sigma = (rng.randn([B], y.device, dtype) * self.P_std + self.P_mean).exp()
        n = rng.randn(y.shape, y.device, dtype)
        weight = batch_view((sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2, y)
        D, logvar = net(y.to(dtype) + batch_view(sigma, y) * n, sigma, labels, return_logvar=True)
        loss = (weight / logvar.exp() * (D - y).square() + logvar).flatten(1).sum(dim=1)
        return LossOutput(loss=loss, pairs=B, student_forward=B, student_backward=B)
