"""The input protocols of FID's Inception detector: how uint8 images become its 299×299 input (docs/spec/cm.md §7,
docs/spec/edm2_latent.md §5.1). Two are implemented, each beside its definition:

  * "nvidia" — NVIDIA's detector (`inception-2015-12-05.pt` / `.pkl`; every FID EDM, EDM2, ECT and CMT report);
  * "pytorch-fid" — pytorch-fid's `InceptionV3`, for comparing with numbers its users report.

The protocol is a setting of the detector (engine/metrics/inception.py), not of the weight file: all the files
hold the same TensorFlow weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Preprocessing", "NVIDIA", "PYTORCH_FID", "PREPROCESSING", "fid_preprocessing"]


def _nvidia_input(images: torch.Tensor) -> torch.Tensor:
    """NVIDIA's detector (the forward inside `inception-2015-12-05.pt`): float32, resize to 299 × 299 with
    `grid_sample` on the shifted identity grid (source pixel i·W/299, border clamp), then (x − 128)/128."""
    n, c, h, w = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def _pytorch_fid_input(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid (`fid_score.py` reads images with ToTensor, i.e. x/255 in float32; `InceptionV3.forward`
    resizes with `F.interpolate(bilinear, align_corners=False)` and maps [0, 1] to [−1, 1] as 2x − 1)."""
    x = images.to(torch.float32) / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images become the detector's input: a named protocol, what it does, and the function."""
    name: str
    resize: str
    scaling: str
    offset: float   # input = (resized − offset) / scale, in grey levels
    scale: float
    apply: Callable[[torch.Tensor], torch.Tensor]

    def record(self) -> dict:
        return {"name": self.name, "resize": self.resize, "scaling": self.scaling}


NVIDIA = Preprocessing(
    "nvidia", "grid_sample(bilinear, border, align_corners=False) to 299x299 on NVIDIA's affine grid "
    "(identity + 1/W - 1/299 shift; source pixel i*W/299)", "(x - 128) / 128", 128.0, 128.0, _nvidia_input)
PYTORCH_FID = Preprocessing(
    "pytorch-fid", "F.interpolate(bilinear, align_corners=False) to 299x299", "2 * (x / 255) - 1", 127.5, 127.5,
    _pytorch_fid_input)
PREPROCESSING = {p.name: p for p in (NVIDIA, PYTORCH_FID)}


def fid_preprocessing(name: str) -> Preprocessing:
    if name not in PREPROCESSING:
        raise ValueError(f"unknown FID preprocessing {name!r}; known: {', '.join(PREPROCESSING)} (nvidia is what "
                         f"EDM, EDM2, ECT and CMT report)")
    return PREPROCESSING[name]
