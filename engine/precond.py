"""Preconditioning wrappers: the one denoiser signature `denoiser(x, sigma, labels=None) -> x0`.

`EDMPrecond` is the teacher's parameterisation; `CMPrecond` (the reference calls it `ECMPrecond`) is the
consistency student's. Both own their backbone as the attribute `model`, so state_dict keys read
`model.<...>` exactly as in NVlabs/edm and sony/cmt checkpoints (spec/cm.md §5.5).

Arithmetic: inputs are cast to float32 as the reference does (spec/cm.md §1.2), except float64 inputs, which
stay float64 so that a `.double()` module gives a float64 reference denoiser.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.schedules import SIGMA_DATA


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_sigma(sigma, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """σ as a python float, a 0-d, [B] or [B,1,...,1] tensor → a [B or 1, 1, ..., 1] tensor broadcastable to x."""
    dtype = dtype or compute_dtype(x)
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.ndim > 1 and any(d != 1 for d in s.shape[1:]):
        raise ValueError(f"sigma must be a scalar, [B] or [B,1,...,1]; got shape {tuple(s.shape)}")
    s = s.reshape(-1, *([1] * (x.ndim - 1)))
    if s.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma has {s.shape[0]} entries for a batch of {x.shape[0]}")
    return s


def as_class_labels(labels, label_dim: int, batch: int, device, dtype) -> torch.Tensor | None:
    """Labels in any of the accepted forms → one-hot/soft float [B, label_dim], or None when unconditional.

    Accepted: None; integer class indices [B]; float one-hot or soft labels [B, label_dim]. EDM's wrappers drop
    labels when label_dim == 0 whatever was passed (spec/cm.md §1.2), and feed zeros when none are given."""
    if label_dim == 0:
        return None
    if labels is None:
        return torch.zeros(batch, label_dim, device=device, dtype=dtype)
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) and labels.ndim == 1:
        if labels.numel() and (labels.min() < 0 or labels.max() >= label_dim):
            raise ValueError(f"class index out of range [0, {label_dim}): {labels.min().item()}..{labels.max().item()}")
        labels = nn.functional.one_hot(labels.long(), label_dim)
    if labels.ndim != 2 or labels.shape[1] != label_dim:
        raise ValueError(f"labels must be class indices [B] or one-hot [B, {label_dim}]; got {tuple(labels.shape)}")
    if labels.shape[0] not in (1, batch):
        raise ValueError(f"{labels.shape[0]} labels for a batch of {batch}")
    return labels.to(dtype).expand(batch, -1)


class _Precond(nn.Module):
    """Shared machinery: σ/label normalisation and the backbone call. Subclasses define c_skip and c_out."""

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0,
                 sigma_max: float = math.inf):
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def label_dim(self) -> int:
        return int(getattr(self.model, "label_dim", 0))

    def skip_out(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, labels=None, augment_labels=None) -> torch.Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        sigma = as_sigma(sigma, x, dtype)
        sd = self.sigma_data
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = (sigma.log() / 4).reshape(-1).expand(x.shape[0])
        c_skip, c_out = self.skip_out(sigma)
        class_labels = as_class_labels(labels, self.label_dim, x.shape[0], x.device, dtype)
        F_x = self.model(c_in * x, c_noise, class_labels=class_labels, augment_labels=augment_labels)
        # The reference casts F to float32 before the skip combination (spec/cm.md §1.2): under bf16 autocast
        # the backbone returns bf16, the output side stays in fp32.
        return c_skip * x + c_out * F_x.to(dtype)

    def round_sigma(self, sigma):
        """EDM's round_sigma is the identity for these wrappers."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM preconditioning (spec/cm.md §1.2): c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
    c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4."""

    def skip_out(self, sigma):
        sd = self.sigma_data
        return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()


class CMPrecond(_Precond):
    """Consistency-model preconditioning (the reference's `ECMPrecond`, spec/cm.md §1.3).

    In eval mode c_skip = σ_d²/((σ−σ_min)²+σ_d²) and c_out = (σ−σ_min)σ_d/√(σ²+σ_d²) (note: σ, not σ−σ_min, in
    the c_out root), so f(x, σ_min) = x exactly. In train mode the reference uses the plain EDM coefficients —
    no boundary condition — so every forward inside a training loss (student pass and stop-gradient target pass)
    is EDM-parameterised, and a student initialised from the teacher equals it at step 0. We keep that switch
    because released numbers depend on it."""

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.003,
                 sigma_max: float = math.inf):
        super().__init__(model, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)

    def skip_out(self, sigma):
        sd = self.sigma_data
        if self.training:
            return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        s = sigma - self.sigma_min
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / (sigma ** 2 + sd ** 2).sqrt()
