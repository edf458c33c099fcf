"""Training on VAE latents stored as posterior moments (EDM2's latent datasets, docs/spec/edm2_latent.md §3.1; the
Mean Flow ImageNet-256 setup, docs/spec/mf.md §7.1): every time an example is drawn, a fresh posterior sample

    z = mean + std·n,  n ~ N(0, I)

is taken and mapped to model space, then the wrapped objective runs on it as on any image batch:

    convention 'sd'    z·0.18215                    (DiT / SiT / Mean Flow)
    convention 'edm2'  z·scale_c + bias_c per channel  (EDM2: standardised to std 0.5)

The noise comes from the step's random stream (drawn first, so the inner objective's draws follow it), so a
resumed or re-sharded run replays exactly.
"""
from __future__ import annotations

import functools

import torch

from engine.errors import EngineError
from engine.objectives.base import LossOutput, StepRNG, Wrapper
from engine.perceptual.vae import BIAS, SCALE, SD_SCALING

CONVENTIONS = ("sd", "edm2")


def posterior_sample(moments: torch.Tensor, noise: torch.Tensor, convention: str) -> torch.Tensor:
    """Model-space latents from moments [B, 2C, H, W] and unit noise [B, C, H, W]."""
    if convention not in CONVENTIONS:
        raise EngineError(f"latent convention must be one of {CONVENTIONS}, got {convention!r}")
    if moments.ndim != 4 or moments.shape[1] != 2 * noise.shape[1]:
        raise EngineError(f"moments must be [B, 2·C, H, W] (mean, then std); got {tuple(moments.shape)} for noise "
                         f"{tuple(noise.shape)}")
    mean, std = moments.chunk(2, dim=1)
    z = mean + std * noise
    if convention == "sd":
        return z * SD_SCALING
    if z.shape[1] != len(SCALE):
        raise EngineError(f"the edm2 convention is for the SD VAE's 4 latent channels, got {z.shape[1]}")
    scale, bias = _edm2_affine(z.dtype, z.device)
    return z * scale + bias


@functools.lru_cache(maxsize=None)
def _edm2_affine(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM2's per-channel scale and bias as [1, C, 1, 1] tensors on `device`, made once: built from the constants
    on every step they were a host-to-device copy a step (tests/test_host_traffic.py)."""
    scale = torch.tensor(SCALE, dtype=dtype, device=device).reshape(1, -1, 1, 1)
    bias = torch.tensor(BIAS, dtype=dtype, device=device).reshape(1, -1, 1, 1)
    return scale, bias


class LatentPosterior(Wrapper):
    """`inner` on posterior samples of the moments the loader gives (engine.data.sampler.LatentSource)."""

    def __init__(self, inner, convention: str = "sd"):
        if convention not in CONVENTIONS:
            raise EngineError(f"latent convention must be one of {CONVENTIONS}, got {convention!r}")
        super().__init__(inner)
        self.convention = convention
        self.name = f"{inner.name}@latents"

    def __call__(self, net, moments, labels, rng: StepRNG) -> LossOutput:
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise EngineError(f"expected posterior moments [B, 2·C, H, W] from a latent dataset, got "
                             f"{tuple(moments.shape)}")
        c = moments.shape[1] // 2
        noise = rng.randn((moments.shape[0], c, *moments.shape[2:]), moments.device, torch.float32)
        return self.inner(net, posterior_sample(moments.float(), noise, self.convention), labels, rng)
