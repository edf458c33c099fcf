"""Image grids as PNG: the one place images in [−1, 1] become uint8 pixels.

The uint8 conversion is EDM's (docs/spec/cm.md §7.2): clip(x·127.5 + 128, 0, 255) then a truncating cast, so grids
show exactly the pixels the FID pipeline would see."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


def samples_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Generated [N, C, H, W] floats in [−1, 1] → uint8 [N, H, W, C] the way EDM's generate.py and the FID code
    convert samples (datasets use the exact inverse of x/127.5 − 1 instead: engine.data.float_to_uint8)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    x = (images.detach().to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, path: str, ncols: int | None = None, pad: int = 1) -> str:
    """Tile N images into rows of `ncols` (default ≈ √N) and write a PNG atomically (temp file + rename)."""
    from PIL import Image

    pix = samples_to_uint8(images)
    n, h, w, c = pix.shape
    if c not in (1, 3):
        raise ValueError(f"image grids need 1 or 3 channels, got {c}")
    ncols = ncols or max(1, int(np.ceil(np.sqrt(n))))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = pix[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
