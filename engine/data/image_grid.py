"""Image grids as PNG: the one place images in [−1, 1] become uint8 pixels.

The uint8 conversion is EDM's (docs/spec/cm.md §7.2): clip(x·127.5 + 128, 0, 255) then a truncating cast, so grids
show exactly the pixels the FID pipeline would see."""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from engine.checkpoints.files import atomic_write


def samples_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Generated [N, C, H, W] floats in [−1, 1] → uint8 [N, H, W, C] the way EDM's generate.py and the FID code
    convert samples (datasets use the exact inverse of x/127.5 − 1 instead: engine.data.float_to_uint8)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    x = (images.detach().to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, C, H, W] → [N, C, factor·H, factor·W] by repeating each pixel (for viewing: 8×8 digits are unreadable at
    native size, and nearest repetition adds no detail the model did not produce)."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upscale factor must be a positive integer, got {factor!r}")
    return images if factor == 1 else images.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def _grid_pixels(images: torch.Tensor, ncols: int | None, pad: int) -> np.ndarray:
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
    return grid


def save_image_grid(images: torch.Tensor, path: str, ncols: int | None = None, pad: int = 1) -> str:
    """Tile N images into rows of `ncols` (default ≈ √N) and write a PNG atomically (temp file + rename)."""
    from PIL import Image

    grid = _grid_pixels(images, ncols, pad)
    return _save_png(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), path)


def save_labeled_panels(panels: list[tuple[str, torch.Tensor]], path: str, ncols: int | None = None,
                        pad: int = 2, gap: int = 12, per_row: int | None = None) -> str:
    """One picture of several image grids, each under its label, `per_row` panels a row (default: all in one):
    [(label, images [N, C, H, W] in [−1, 1]), ...], every panel with the same image size and channels (e.g. real |
    teacher | student samples). Labels are drawn in PIL's default bitmap font (ASCII). Written atomically, like
    save_image_grid."""
    from PIL import Image, ImageDraw

    if not panels:
        raise ValueError("save_labeled_panels needs at least one (label, images) panel")
    grids = [_grid_pixels(images, ncols, pad) for _, images in panels]
    if len({g.shape for g in grids}) != 1:
        raise ValueError("every panel needs the same number, size and channels of images, got grids of shapes "
                         + ", ".join(str(g.shape) for g in grids))
    gh, gw, c = grids[0].shape
    top = 16                                 # one line of PIL's default bitmap font
    per_row = per_row or len(grids)
    rows = -(-len(grids) // per_row)
    canvas = Image.new("RGB", (per_row * (gw + gap) - gap, rows * (gh + top + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, ((label, _), g) in enumerate(zip(panels, grids)):
        x, y = (i % per_row) * (gw + gap), (i // per_row) * (gh + top + gap)
        canvas.paste(Image.fromarray(g[..., 0] if c == 1 else g).convert("RGB"), (x, y + top))
        draw.text((x + 2, y + 2), label, fill=(0, 0, 0))
    return _save_png(canvas, path)


def _save_png(img, path: str) -> str:
    """Encode, then write through the engine's one atomic writer (engine/checkpoints/files.py `atomic_write`:
    temporary file, fsync, rename), which creates files as open() does — mode 0o666 less the umask — like every
    other file of a run (a `tempfile.mkstemp` temporary would leave the grid at mode 0o600)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    encoded = io.BytesIO()
    img.save(encoded, format="PNG")
    atomic_write(path, lambda f: f.write(encoded.getvalue()))
    return path
