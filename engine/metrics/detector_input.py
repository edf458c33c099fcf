"""What the feature networks of FID and FD_DINOv2 accept: uint8 RGB images [N, 3, H, W] (single-channel images
repeated to three channels, as the reference metric code does)."""
from __future__ import annotations

import torch


def uint8_rgb(images: torch.Tensor, detector: str) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise ValueError(f"the {detector} detector takes uint8 images (0…255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
