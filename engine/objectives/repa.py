"""REPA (Yu et al. 2025): representation alignment of a flow network's intermediate image tokens with a frozen
vision encoder's patch tokens of the clean image, added to another objective's loss (issue 21).

    loss = inner loss + λ · (−mean over tokens of cos(h_φ(z_k), y*))         per pair, λ = `weight` (REPA: 0.5)

h_φ(z_k) is the network's REPA projector applied to its image tokens after block k (engine/networks/mmdit.py:
`projectors`, `encoder_depth`; 2048-wide, SiLU MLP as REPA), y* the DINOv2 ViT-B/14 final-norm patch tokens of the
clean image (engine/metrics/dinov2.py `repa_features`), stored beside the latents because a latent dataset holds no
pixels (engine/data/captions.py). Both are L2-normalised along the feature axis; the mean over tokens and pairs of
−cos is REPA's `proj_loss` (sihyun-yu/REPA loss.py at 67f7145), the loop's mean over pairs of the sum its total.

The batch's labels are a pair (condition, target features [B, T, D]). The projector output is taken from the one
gradient-carrying forward of the network in the step — the prediction of flow matching, Mean Flow and CMT-MF (their
no-grad passes, guidance and the JVP, do not count) — which the network appends to `feature_sink` while this
objective holds it. Its rows follow the inner objective's pairs: one per image (flow matching, Mean Flow), or
pair-major q·m + b over an image's k pairs (CMT-MF), so pair row n aligns with image n mod m. For CMT-MF the
trajectories start from noise with the image's caption, so the image's features are a target by association, not
the trajectory endpoint's own features: the paper says every COCO model uses REPA but not how mid-training does
(docs/spec/mf.md §4.5, unresolved), and the recipe makes it a setting.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from engine import dist
from engine.checks import finite
from engine.errors import EngineError
from engine.objectives.base import LossOutput, StepRNG, Wrapper


def alignment(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−mean over tokens of the cosine similarity, per row: features [n, T, D], target [n, T, D] → [n] (float32, or
    float64 for float64 features)."""
    if features.shape != target.shape:
        raise EngineError(f"REPA: the projector gives {tuple(features.shape[1:])} per sample, the stored encoder "
                          f"features are {tuple(target.shape[1:])}: their token count and width must match")
    dtype = torch.promote_types(features.dtype, torch.float32)      # bf16 features are compared in float32
    f, y = F.normalize(features.to(dtype), dim=-1), F.normalize(target.to(dtype), dim=-1)
    return -(f * y).sum(-1).mean(1)


class REPA(Wrapper):
    """`inner` plus λ·REPA alignment (module docstring); `weight` λ (REPA: 0.5; 0: the inner objective alone, on
    the condition half of the labels)."""

    def __init__(self, inner, weight: float = 0.5):
        super().__init__(inner)
        self.weight = finite("weight", weight, "REPA", low=0.0)
        self.name = f"{inner.name}+repa"

    def __call__(self, net, images, labels, rng: StepRNG) -> LossOutput:
        if not (isinstance(labels, (tuple, list)) and len(labels) == 2):
            raise EngineError("REPA needs labels = (condition, encoder features [B, T, D]) from its data source "
                              "(engine.data.captions.CaptionedLatentSource with REPA features)")
        condition, target = labels
        if self.weight == 0:       # REPA off for this stage (its data still carries the targets)
            return self.inner(net, images, condition, rng)
        base = dist.unwrap(net)
        if not getattr(base, "projectors", None):
            raise EngineError(f"REPA: {type(base).__name__} has no REPA projector (build it with z_dim set)")
        sink: list = []
        base.feature_sink = sink
        try:
            out = self.inner(net, images, condition, rng)
        finally:
            base.feature_sink = None
        if len(sink) != 1:
            raise EngineError(f"REPA aligns the step's one gradient-carrying forward of the network; "
                              f"{self.inner.name} made {len(sink)}")
        z = sink[0][0]
        m = target.shape[0]
        if z.shape[0] % m:
            raise EngineError(f"REPA: {z.shape[0]} projected rows for {m} images")
        rows = torch.arange(z.shape[0], device=z.device) % m
        repa = alignment(z, target.to(z.device)[rows])
        return dataclasses.replace(out, loss=out.loss + self.weight * repa.to(out.loss.dtype))

    def log_values(self) -> dict:
        return self.inner.log_values()
