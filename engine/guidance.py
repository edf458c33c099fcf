"""Guided denoisers: classifier-free guidance and autoguidance as one denoiser (docs/spec/edm2_latent.md §4.2).

    D_w(x; σ, c) = D₀(x; σ, c) + w·(D₁(x; σ, c) − D₀(x; σ, c))

with D₁ the main network and D₀ the guiding one: an unconditional network (CFG; EDM2's `…-uncond-…` XS) or a
smaller, less-trained conditional one (autoguidance), evaluated on the same (x, σ, labels). w = 1 is the main
network alone, returned as is (the guide is not evaluated). The combination is `torch.lerp(D₀, D₁, w)`, the
arithmetic of EDM2's `generate_images.py`. A `GuidedDenoiser` has the one denoiser signature, so CMT's teacher
solver, ECD's teacher step and every sampler take it as a teacher. The published pairs are in
engine/pipelines/edm2_presets.py (`GUIDED`).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.checks import finite
from engine.errors import EngineError

__all__ = ["guided", "GuidedDenoiser"]


def guided(D_main: torch.Tensor, D_guide: torch.Tensor, w: float) -> torch.Tensor:
    """D₀ + w·(D₁ − D₀), computed as EDM2 does (lerp)."""
    return torch.lerp(D_guide.to(D_main.dtype), D_main, float(w))


class GuidedDenoiser(nn.Module):
    """`net(x, sigma, labels=None)` of a main and a guiding denoiser with guidance weight `w`.

    `guide_labels`: 'same' passes the labels to the guide (autoguidance, and EDM2's unconditional CFG guides, whose
    wrappers drop labels when label_dim is 0); 'none' passes None (CFG with a network trained with label
    dropout, whose unconditional output is its output without labels). Both networks are frozen here."""

    def __init__(self, main: nn.Module, guide_net: nn.Module, w: float, guide_labels: str = "same"):
        super().__init__()
        if not (isinstance(main, nn.Module) and isinstance(guide_net, nn.Module)):
            raise EngineError("GuidedDenoiser: main and guide must be networks (nn.Module)")
        if guide_labels not in ("same", "none"):
            raise EngineError(f"GuidedDenoiser: guide_labels must be 'same' or 'none', got {guide_labels!r}")
        self.main, self.guide = main, guide_net
        self.w = finite("w", w, "GuidedDenoiser")
        self.guide_labels = guide_labels
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def label_dim(self) -> int:
        return int(getattr(self.main, "label_dim", 0))

    @property
    def calls(self) -> int:
        """Network evaluations per denoiser call (for NFE counts: "63×2" in the CMT tables)."""
        return 1 if self.w == 1 else 2

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        D = self.main(x, sigma, labels)
        if self.w == 1:
            return D
        g = self.guide(x, sigma, labels if self.guide_labels == "same" else None)
        return guided(D, g, self.w)
