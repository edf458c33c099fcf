"""Exponential moving averages of the student's parameters (buffers are copied, not averaged, as the reference
does: docs/spec/cm.md §3.4).

* constant β: θ_ema ← β θ_ema + (1 − β) θ after every step (CMT mid-training 0.999, post-training 0.9999);
* EDM2's power-function EMA with relative standard deviation σ_rel: β_t = (1 − Δ/t)^{γ+1}, t the images seen after
  the step and Δ the batch, with γ the root of σ_rel² = (γ+1)/((γ+2)²(γ+3)) (Karras et al. 2024, Eq. 3).
"""
from __future__ import annotations

import copy
import re

import numpy as np
import torch
from torch import nn


def std_to_exp(std: float) -> float:
    """γ such that the power-function profile has relative std σ_rel: (γ+2)²(γ+3)σ² = γ+1, i.e. the largest real
    root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    if not 0 < std < 0.2887:  # σ_rel < 1/√12 (γ → −1) is required for a valid profile
        raise ValueError(f"power EMA std must be in (0, 0.2887), got {std}")
    roots = np.roots([1.0, 7.0, 16.0 - std ** -2, 12.0 - std ** -2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


_SNAPSHOT = re.compile(r"^(.*)-(\d+)-(\d+\.\d+)\.(pkl|safetensors)$")


def snapshot_name(prefix: str, nimg: int, std: float) -> str:
    """This engine's snapshot files: `{prefix}-{images:012d}-{σ_rel:.3f}.safetensors` — EDM2's pattern
    (`{prefix}-{kimg:07d}-{σ_rel:.3f}.pkl`, docs/spec/edm2_latent.md §2.3) with the exact image count, numbered as
    the checkpoints are, so that snapshots less than 1000 images apart (a short stage's last one) never share a
    name."""
    return f"{prefix}-{nimg:012d}-{std:.3f}.safetensors"


def kimg_to_nimg(kimg: int) -> int:
    """The image count an EDM2 file name's kimg stands for: its runs snapshot at multiples of 1024 images, so the
    name's ⌊nimg/1000⌋ maps back to ((kimg·1000 + 999) // 1024)·1024 (EDM2's reconstruct_phema.py)."""
    return (kimg * 1000 + 999) // 1024 * 1024


def parse_snapshot_name(name: str):
    """(prefix, number, σ_rel) of a snapshot file name, or None; the number is kimg in EDM2's .pkl names and
    images in this engine's .safetensors names."""
    m = _SNAPSHOT.match(name)
    return None if m is None else (m.group(1), int(m.group(2)), float(m.group(3)))


class EMA(nn.Module):
    """Holds the averaged copy (`self.module`, eval mode, no grad). `beta` for a constant rate, or `std` for the
    power function; `update(net, nimg, batch)` after each optimizer step."""

    def __init__(self, net: nn.Module, beta: float | None = None, std: float | None = None):
        super().__init__()
        if (beta is None) == (std is None):
            raise ValueError("give exactly one of beta (constant EMA) or std (EDM2 power-function EMA)")
        if beta is not None and not 0 <= beta < 1:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta, self.std = beta, std
        self.gamma = None if std is None else std_to_exp(std)
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    def beta_at(self, nimg_after: int, batch: int) -> float:
        if self.beta is not None:
            return self.beta
        return (1.0 - batch / nimg_after) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self, net: nn.Module, nimg_after: int, batch: int) -> float:
        beta = self.beta_at(nimg_after, batch)
        ema_p = list(self.module.parameters())
        net_p = [p.detach() for p in net.parameters()]
        if len(ema_p) != len(net_p):
            raise RuntimeError("EMA and network have different parameter lists")
        # one fused update per kind of tensor (FSDP2 leaves 0-d parameters as plain tensors beside its DTensors)
        kinds: dict = {}
        for e, n in zip(ema_p, net_p):
            kinds.setdefault(type(e), ([], []))
            kinds[type(e)][0].append(e)
            kinds[type(e)][1].append(n)
        for e, n in kinds.values():
            torch._foreach_lerp_(e, n, 1.0 - beta)
        for b_ema, b_net in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b_net)
        return beta
